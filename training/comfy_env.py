"""Make ComfyUI importable from a training command, and load the pack's shapes-world package.

ComfyUI goes first on sys.path (path from env MC_COMFYUI, else ~/.cache/more-control/ComfyUI),
and its arguments are set before anything imports `comfy.model_management`: CPU unless CUDA is
available. The pack's `nodes/shapes_world` package is loaded under the name `mc_shapes_world`
(the pack's own `nodes/` must never shadow ComfyUI's `nodes` module).
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

import torch

PACK_DIR = pathlib.Path(__file__).resolve().parents[1]
COMFY_DIR = pathlib.Path(os.environ.get("MC_COMFYUI", pathlib.Path.home() / ".cache" / "more-control" / "ComfyUI"))


def setup():
    """Idempotent: returns the `mc_shapes_world` package."""
    if "mc_shapes_world" in sys.modules:
        return sys.modules["mc_shapes_world"]
    if not (COMFY_DIR / "comfyui_version.py").exists():
        raise SystemExit(f"No ComfyUI at {COMFY_DIR}: set MC_COMFYUI or run scripts/setup_comfyui.sh")
    if str(COMFY_DIR) in sys.path:
        sys.path.remove(str(COMFY_DIR))
    sys.path.insert(0, str(COMFY_DIR))
    from . import distributed
    distributed.select_cuda_device()  # under torchrun: this process's GPU before ComfyUI picks one
    import comfy.cli_args
    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    comfy.cli_args.args.disable_api_nodes = True
    import comfy.model_management  # noqa: F401  (reads the arguments now)

    pkg_dir = PACK_DIR / "nodes" / "shapes_world"
    spec = importlib.util.spec_from_file_location("mc_shapes_world", pkg_dir / "__init__.py",
                                                  submodule_search_locations=[str(pkg_dir)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["mc_shapes_world"] = module
    spec.loader.exec_module(module)
    return module


def device() -> torch.device:
    setup()
    import comfy.model_management
    return comfy.model_management.get_torch_device()
