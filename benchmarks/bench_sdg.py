"""Per-step cost of semantic diffusion guidance against the unpatched model, same run.

    python benchmarks/bench_sdg.py                       # shapes world (shipped models), CPU
    python benchmarks/bench_sdg.py --modes noise-aware --steps 20 --repeats 5 --json out.json
    python benchmarks/bench_sdg.py --gpu                 # on the GPU if there is one
    python benchmarks/bench_sdg.py --model sd15 --steps 3 --repeats 2   # SD1.5-size UNet at 512x512 and an
                                                         # RN50-size noise-aware encoder, random weights

The shapes world's UNet is tiny (about 30 ms a step on this CPU) and its encoder, a CLIP ResNet run
at its native grid, costs about as much as the UNet; on the models users run the UNet dominates, so
`--model sd15` measures the same hook with SD1.5's UNet and an RN50 noise-aware encoder (noise-aware
mode only: the decoded modes would need a full-size VAE and image tower as well).

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
    parser.add_argument("--model", choices=["shapes-world", "sd15"], default="shapes-world")
    parser.add_argument("--size", type=int, default=512, help="--model sd15: image size in pixels")
    parser.add_argument("--encoder", default="RN50", help="--model sd15: open_clip architecture of the noise-aware encoder")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    env = harness.comfy_env(cpu=not args.gpu)
    import torch

    if args.model == "sd15":
        return full_size_main(args, env, torch)
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


def full_size_main(args, env, torch):
    """SD1.5's UNet and an open_clip tower's noise-aware encoder, both seeded random weights."""
    import open_clip

    from bench_segfree import sd15_full_size

    glue = env.module("nodes.glue")
    algo = env.module("nodes.algorithms.sdg")
    clip_models = env.module("nodes.clip_models")
    dtype = torch.float16 if args.gpu and torch.cuda.is_available() else torch.float32
    model = sd15_full_size(dtype)
    config = open_clip.get_model_config(args.encoder)
    vision_config = {"embed_dim": config["embed_dim"], "vision_cfg": config["vision_cfg"],
                     "quick_gelu": config.get("quick_gelu", False)}
    with torch.inference_mode(False):
        torch.manual_seed(0)
        encoder = algo.NoiseAwareEncoder(clip_models.build_vision_tower(vision_config), 4).requires_grad_(False).eval()
    scale = float(model.model.latent_format.scale_factor)
    record = algo.EncoderRecord(vision_config, 4, type(model.model.latent_format).__name__, scale, "random weights")
    encoder_file = glue.guidance.NoiseAwareEncoderFile(encoder, record, f"random {args.encoder}")
    text = torch.nn.functional.normalize(torch.randn(1, config["embed_dim"], generator=torch.Generator().manual_seed(1)), dim=-1)
    guidance = glue.guidance.Guidance([glue.guidance.GuidanceTerm("text", 100.0, None, "benchmark", text_embedding=text)])
    settings = glue.guidance.SemanticSettings(every_n_steps=args.every)
    patched = glue.guidance.apply_semantic_guidance(model, guidance, settings, encoder_file=encoder_file)
    clip = glue.clip_with_token_maps(harness.tiny_models.tiny_clip(seed=2))
    positive = harness.tiny_models.encode(clip, "a red circle")
    empty = harness.tiny_models.encode(clip, "")
    latent = torch.zeros(args.batch, 4, args.size // 8, args.size // 8)
    params = sum(p.numel() for p in encoder.parameters()) / 1e6
    print(f"semantic guidance vs the unpatched model: SD1.5-size UNet (random weights), {args.size}x{args.size}, "
          f"batch {args.batch}; noise-aware encoder from a random open_clip {args.encoder} ({params:.0f}M parameters), "
          f"every {args.every} step(s)")
    results = []
    for cfg in args.cfg:
        r = harness.compare_sampling(f"SDG noise-aware (SD1.5 size), cfg {cfg:g}", model, patched, positive, empty, latent,
                                     steps=args.steps, cfg=cfg, repeats=args.repeats)
        r.update(mode="noise-aware", cfg=cfg, every_n_steps=args.every, model="sd15", encoder=args.encoder,
                 guided_calls=glue.guidance_hook(patched).calls)
        results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
