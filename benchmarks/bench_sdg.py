"""Per-step cost of semantic diffusion guidance against the unpatched model, same run.

    python benchmarks/bench_sdg.py                       # shapes world (shipped models), CPU
    python benchmarks/bench_sdg.py --modes noise-aware --steps 20 --repeats 5 --json out.json
    python benchmarks/bench_sdg.py --gpu                 # on the GPU if there is one

Goals (issue 8): noise-aware <= 1.3x, decoded (fast) <= 3x; decoded (exact) reported. Text guidance
on the empty prompt at cfg 1 (the paper's protocol: one UNet pass per step, so the guidance's own
cost weighs the most), and at cfg 5 (two UNet passes per step). Peak memory: CUDA's
max_memory_allocated on a GPU, else the process's resident high-water mark (ru_maxrss).
"""
from __future__ import annotations

import argparse
import json
import resource

import harness

MODES = ["noise-aware", "decoded (fast)", "decoded (exact)"]


def peak_memory_mb(torch) -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="*", default=MODES, choices=MODES)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cfg", type=float, nargs="*", default=[1.0, 5.0])
    parser.add_argument("--every", type=int, default=1, help="every_n_steps of the guided runs")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    env = harness.comfy_env(cpu=not args.gpu)
    import torch

    loader = env.module("nodes.shapes_world_loader")
    sdg = env.module("nodes.sdg")
    glue = env.module("nodes.glue")
    bundle = loader.load("trained", 0)
    model, vae, mc_clip, clip = bundle["model"], bundle["vae"], bundle["mc_clip"], bundle["clip"]
    empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    encoder = None
    if sdg.SHAPES_WORLD_ENCODER_PATH.exists():
        (encoder,) = sdg.NoiseAwareEncoderLoader.execute(sdg.SHAPES_WORLD_ENCODER).result
    (text,) = sdg.TextGuidance.execute(mc_clip, "a red circle", 100.0).result
    latent = torch.zeros(args.batch, 4, 16, 16)
    print(f"semantic guidance vs the unpatched model: shapes world ({loader.describe(bundle)}), batch {args.batch}, "
          f"text guidance, every {args.every} step(s); encoder: {encoder!r}")
    results = []
    for mode in args.modes:
        if mode == "noise-aware" and encoder is None:
            print("noise-aware: no shipped encoder (models/shapes_world/noise_aware.safetensors); skipped")
            continue
        (patched,) = sdg.ApplySemanticGuidance.execute(model, text, mode, 0.0, 1.0, args.every, 0, vae=vae,
                                                       noise_aware_encoder=encoder).result
        for cfg in args.cfg:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            before = peak_memory_mb(torch)
            r = harness.compare_sampling(f"SDG {mode}, cfg {cfg:g}", model, patched, empty, empty, latent,
                                         steps=args.steps, cfg=cfg, repeats=args.repeats)
            r.update(mode=mode, cfg=cfg, every_n_steps=args.every, guided_calls=glue.guidance_hook(patched).calls,
                     peak_memory_mb=round(peak_memory_mb(torch), 1), peak_memory_mb_before=round(before, 1),
                     memory_kind="cuda max_memory_allocated" if torch.cuda.is_available() else "process ru_maxrss")
            print(f"    peak memory {r['peak_memory_mb']:.0f} MB ({r['memory_kind']}; {before:.0f} MB before this row)")
            results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
