"""Benchmark harness: per-step cost of a model patch against the unpatched model, same process.

Machines here are noisy, so a benchmark never asserts a time: it interleaves baseline and
patched runs (A B A B ...), takes the median per-step time of each, and prints their ratio.
Usage from a benchmark script:

    from harness import comfy_env, compare_sampling
    env = comfy_env()                    # real ComfyUI in this process, the pack loaded by its loader
    compare_sampling("segfree", baseline_model, patched_model, positive, negative, ...)
"""
from __future__ import annotations

import asyncio
import pathlib
import statistics
import sys
import time
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import comfy_harness  # noqa: E402  (puts ComfyUI on sys.path and sets its arguments)
import tiny_models  # noqa: E402,F401  (re-exported for benchmark scripts)


@dataclass
class ComfyEnv:
    nodes: object
    pack: object

    def module(self, dotted: str):
        import importlib

        return importlib.import_module(f"{self.pack.__name__}.{dotted}")


_env: ComfyEnv | None = None


def comfy_env(cpu: bool = True) -> ComfyEnv:
    """ComfyUI's nodes with the pack loaded by ComfyUI's own loader (once per process)."""
    global _env
    if _env is None:
        import comfy.cli_args
        import torch

        comfy.cli_args.args.cpu = cpu or not torch.cuda.is_available()
        import nodes

        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        link = comfy_harness.BASE_DIR / "custom_nodes" / comfy_harness.PACK_LINK_NAME
        _env = ComfyEnv(nodes, sys.modules[str(link).replace(".", "_x_")])
    return _env


def sample_seconds(model, positive, negative, latent, steps: int, cfg: float, sampler: str = "euler", seed: int = 0) -> float:
    import comfy.model_management
    import torch

    env = comfy_env()
    start = time.perf_counter()
    env.nodes.common_ksampler(model, seed, steps, cfg, sampler, "normal", positive, negative, {"samples": latent},
                              disable_noise=False)
    if torch.cuda.is_available() and comfy.model_management.get_torch_device().type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare_sampling(label: str, baseline, patched, positive, negative, latent, steps: int = 20, cfg: float = 7.0,
                     repeats: int = 5, baseline_latent=None) -> dict:
    """Interleaved timing of full sampling runs; prints and returns per-step medians and the ratio."""
    import torch

    baseline_latent = latent if baseline_latent is None else baseline_latent
    sample_seconds(baseline, positive, negative, baseline_latent, 2, cfg)  # warm-up: weights loaded, kernels picked
    sample_seconds(patched, positive, negative, latent, 2, cfg)
    base_times, patched_times = [], []
    for _ in range(repeats):
        base_times.append(sample_seconds(baseline, positive, negative, baseline_latent, steps, cfg) / steps)
        patched_times.append(sample_seconds(patched, positive, negative, latent, steps, cfg) / steps)
    base, mod = statistics.median(base_times), statistics.median(patched_times)
    result = {"label": label, "baseline_s_per_step": base, "patched_s_per_step": mod, "ratio": mod / base,
              "baseline_it_s": 1.0 / base, "patched_it_s": 1.0 / mod, "steps": steps, "repeats": repeats,
              "latent": tuple(latent.shape), "device": str(torch.device("cuda") if torch.cuda.is_available() else "cpu")}
    print(f"{label:<44} baseline {base * 1000:8.2f} ms/step ({1 / base:6.2f} it/s)   patched {mod * 1000:8.2f} ms/step "
          f"({1 / mod:6.2f} it/s)   ratio {mod / base:5.3f}x   [{result['device']}, latent {tuple(latent.shape)}, "
          f"{steps} steps, median of {repeats}]")
    return result
