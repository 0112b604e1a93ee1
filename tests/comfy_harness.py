"""Pytest plugin that puts a real ComfyUI 0.3.75 in the test process (loaded with `-p comfy_harness`).

It must run before anything imports `comfy.model_management`, `folder_paths` or `nodes`
(those read the command-line arguments at import), which is why it is a `-p` plugin and
not a conftest. It:
  * puts the ComfyUI tree installed by scripts/setup_comfyui.sh first on sys.path (never the
    pack's own root: its `nodes/` would shadow ComfyUI's `nodes` module);
  * sets ComfyUI's own arguments: CPU, a throw-away base directory, no API nodes;
  * builds that base directory with `custom_nodes/more-control` linked to this checkout,
    exactly as a user's install looks.
"""
from __future__ import annotations

import os
import pathlib
import sys
import tempfile

PACK_DIR = pathlib.Path(__file__).resolve().parents[1]
CACHE = pathlib.Path(os.environ.get("MC_CACHE", pathlib.Path.home() / ".cache" / "more-control"))
COMFY_DIR = pathlib.Path(os.environ.get("MC_COMFYUI", CACHE / "ComfyUI"))
PACK_LINK_NAME = "more-control"

if not (COMFY_DIR / "comfyui_version.py").exists():
    raise RuntimeError(f"No ComfyUI at {COMFY_DIR}: run scripts/setup_comfyui.sh first (the README's test command does).")

BASE_DIR = pathlib.Path(tempfile.mkdtemp(prefix="mc-comfy-base-"))


def make_base_directory(base: pathlib.Path) -> pathlib.Path:
    """A ComfyUI base directory with only this pack installed, as `comfy node install` would leave it."""
    for sub in ("custom_nodes", "models", "input", "output", "temp", "user/default"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_LINK_NAME
    if not link.exists():
        link.symlink_to(PACK_DIR, target_is_directory=True)
    # Skip the first-run templates dialog in the browser tests.
    (base / "user" / "default" / "comfy.settings.json").write_text('{"Comfy.TutorialCompleted": true}')
    return base


make_base_directory(BASE_DIR)

sys.path.insert(0, str(COMFY_DIR))
import comfy.cli_args  # noqa: E402  (the order is the point of this module)

comfy.cli_args.args.cpu = True
comfy.cli_args.args.base_directory = str(BASE_DIR)
comfy.cli_args.args.disable_api_nodes = True
comfy.cli_args.args.disable_auto_launch = True

import folder_paths  # noqa: E402,F401  (reads base_directory now)

# ComfyUI's nodes.py puts ComfyUI/comfy first on sys.path, after which `utils` would resolve to
# comfy/utils.py instead of ComfyUI's utils/ package (the server and frontend manager need the
# package). main.py imports the server first; import that package now, as it does.
import utils.install_util  # noqa: E402,F401


def pytest_report_header(config):
    import comfyui_version
    return [f"ComfyUI {comfyui_version.__version__} from {COMFY_DIR}", f"base directory {BASE_DIR}"]


def training_module(name: str):
    """training/<name>.py, loaded by path as mc_training.<name> (the pack root never goes on sys.path)."""
    import importlib
    import importlib.util

    pkg = PACK_DIR / "training"
    if "mc_training" not in sys.modules:
        spec = importlib.util.spec_from_file_location("mc_training", pkg / "__init__.py",
                                                      submodule_search_locations=[str(pkg)])
        sys.modules["mc_training"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return importlib.import_module(f"mc_training.{name}")
