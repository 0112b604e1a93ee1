"""Benchmarks for the Blended Latent Diffusion nodes (issue 4).

1. Progressive mask shrinking vs plain masked sampling, per step, in the same process and run
   interleaved (A, B, A, B, ...) so machine load hits both alike: the tiny SD1.5-topology UNet
   on a 256x256 image (32x32 latent; --sample-size), ComfyUI's KSampler, euler. Also the direct cost of the mask
   function per step against the model step, which does not depend on load.
2. Decoder fine-tune: time and peak memory for one image (default 512x512, 75 steps) with a tiny
   VAE on the CPU, or an SD-size VAE (random weights, ch 128, mult 1,2,4,4, 2 res blocks) on a GPU.

    python benchmarks/bench_blended.py                       # both, CPU, tiny models
    python benchmarks/bench_blended.py --part finetune --steps 5   # fewer steps, time extrapolated to 75
    python benchmarks/bench_blended.py --part finetune --vae sd --device cuda

Peak memory: CUDA's max_memory_allocated on a GPU; on the CPU the growth of the process's peak RSS
(the fine-tune runs in a fresh child process for that reason).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import pathlib
import resource
import statistics
import subprocess
import sys
import time

PACK_DIR = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK_DIR / "tests"))

import comfy_harness  # noqa: E402  (puts ComfyUI on sys.path with CPU arguments, as for the tests)
import torch  # noqa: E402

import tiny_models  # noqa: E402


def load_pack():
    """Import the pack as a package named `more_control` (never its root on sys.path: its `nodes/`
    would shadow ComfyUI's)."""
    spec = importlib.util.spec_from_file_location("more_control", PACK_DIR / "__init__.py",
                                                  submodule_search_locations=[str(PACK_DIR)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["more_control"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("more_control.nodes.blended"), importlib.import_module("more_control.nodes.algorithms.blended")


def bench_shrink(rounds: int, steps: int, size: int):
    import comfy.utils
    import nodes

    comfy.utils.PROGRESS_BAR_ENABLED = False

    blended, _ = load_pack()
    model = tiny_models.tiny_model("sd15", seed=0)
    clip = tiny_models.tiny_clip(seed=2)
    positive, negative = tiny_models.encode(clip, "a red ball"), tiny_models.encode(clip, "")
    (shrunk,) = blended.ProgressiveMaskShrink.execute(model, "7,5,3,1", "1,1,1,1", 0.5).result
    h = w = size // 8
    mask = torch.zeros(1, size, size)
    mask[:, size // 4: size // 2, size // 3: size // 2] = 1.0
    latent = {"samples": torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(0)), "noise_mask": mask}
    sampler = nodes.KSampler()

    def run(m):
        start = time.perf_counter()
        sampler.sample(m, 1, steps, 5.0, "euler", "normal", positive, negative, latent, denoise=1.0)
        return (time.perf_counter() - start) / steps

    run(model), run(shrunk)  # warm-up (first calls load and allocate)
    plain, shrink = [], []
    for _ in range(rounds):
        plain.append(run(model))
        shrink.append(run(shrunk))
    ratios = [s / p for s, p in zip(shrink, plain)]

    # The mask function alone, on the mask the sampler hands it, against the median step time.
    function = shrunk.model_options["denoise_mask_function"]
    sigmas = torch.linspace(14.6, 0.0, steps + 1)
    latent_mask = (torch.rand(1, 4, h, w) > 0.7).float()
    calls = 200
    start = time.perf_counter()
    for i in range(calls):
        function(sigmas[i % steps: i % steps + 1], latent_mask, {"sigmas": sigmas})
    mask_cost = (time.perf_counter() - start) / calls
    print(f"progressive shrink vs plain masked sampling ({size}x{size}, latent {h}x{w}, {steps} euler steps, "
          f"{rounds} interleaved rounds, torch threads {torch.get_num_threads()}):")
    print(f"  per step: plain {statistics.median(plain) * 1e3:.1f} ms, shrink {statistics.median(shrink) * 1e3:.1f} ms (medians); "
          f"pairwise ratio median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")
    print(f"  best-of-{rounds} per step: plain {min(plain) * 1e3:.1f} ms, shrink {min(shrink) * 1e3:.1f} ms, "
          f"ratio {min(shrink) / min(plain):.3f} (best-of is the least disturbed by other load on the machine)")
    print(f"  mask function alone: {mask_cost * 1e6:.0f} us per call = "
          f"{1 + mask_cost / statistics.median(plain):.4f}x a plain step")


def bench_finetune(size: int, steps: int, vae_kind: str, device: str, full_steps: int = 75):
    _, algo = load_pack()
    import comfy.sd

    if vae_kind == "sd":
        ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    else:  # the test suite's tiny VAE
        ddconfig = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                    "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.sd.VAE(sd={}, config={"params": {"embed_dim": 4, "ddconfig": ddconfig}})
    tiny_models.seeded_init(vae.first_stage_model, 3)
    dev = torch.device(device)
    model = algo.throwaway_copy(vae.first_stage_model, dev)
    model.requires_grad_(False)
    params = list(model.decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, size // 8, size // 8, generator=g).to(dev)
    source = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(dev)
    mask = torch.zeros(1, 1, size, size, device=dev)
    mask[..., size // 4: size // 2, size // 4: size // 2] = 1
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    algo.finetune_decoder(model.decode, params, z, source, mask, steps=steps, lr=1e-4, background_weight=100.0)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    n_params = sum(p.numel() for p in params)
    print(f"decoder fine-tune, {vae_kind} VAE ({n_params / 1e6:.2f}M decoder parameters), {size}x{size}, {steps} steps on "
          f"{device} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{torch.get_num_threads()} threads'}):")
    print(f"  {elapsed:.1f} s measured, {elapsed / steps:.2f} s per step"
          + (f", {elapsed / steps * full_steps:.0f} s for {full_steps} steps (extrapolated)" if steps != full_steps else ""))
    if dev.type == "cuda":
        print(f"  peak GPU memory allocated: {torch.cuda.max_memory_allocated(dev) / 2**20:.0f} MiB")
    else:
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
        print(f"  peak RSS growth during the fine-tune: {grown / 1024:.0f} MiB "
              f"(process peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "shrink", "finetune"], default="all")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved plain/shrink sampling runs")
    parser.add_argument("--sample-steps", type=int, default=4)
    parser.add_argument("--sample-size", type=int, default=256)
    parser.add_argument("--size", type=int, default=512, help="fine-tune image side")
    parser.add_argument("--steps", type=int, default=75, help="fine-tune steps (time is extrapolated to 75)")
    parser.add_argument("--vae", choices=["tiny", "sd"], default="tiny")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.part in ("all", "shrink"):
        bench_shrink(args.rounds, args.sample_steps, args.sample_size)
    if args.part == "finetune":
        bench_finetune(args.size, args.steps, args.vae, args.device)
    elif args.part == "all":  # a fresh process, so its peak RSS is the fine-tune's
        subprocess.run([sys.executable, __file__, "--part", "finetune", "--size", str(args.size), "--steps", str(args.steps),
                        "--vae", args.vae, "--device", args.device], check=True)


if __name__ == "__main__":
    main()
