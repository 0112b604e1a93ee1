"""Per-step cost of segmentation-free guidance over plain CFG, same model, same run.

    python benchmarks/bench_segfree.py                     # tiny SD1 UNet, CPU
    python benchmarks/bench_segfree.py --unet sd15 --size 512 --gpu   # SD1.5-size UNet (random weights)
    python benchmarks/bench_segfree.py --unet tiny-sd3     # tiny SD3 MMDiT (joint attention), CPU
    python benchmarks/bench_segfree.py --unet tiny-flux    # tiny Flux; rows with and without single-stream blocks
    python benchmarks/bench_segfree.py --unet flux --size 1024 --gpu --steps 8 --repeats 3   # Flux-dev size, random weights
    python benchmarks/bench_segfree.py --unet sd3 --size 1024 --gpu   # SD3-medium size, random weights

The paper claims "almost the same computational complexity" as CFG; the goal here is <= 1.10x.
Two SFG rows: every step edited (start_percent 0, the worst case) and the default switch (0.4).

Timing (CPUs here are shared and noisy): after a warm-up, each repeat times one plain-CFG run and
one SFG run back to back, in alternating order (A B, B A, ...) so drift in the machine's load hits
both alike. Reported: the median per-step time of each, their ratio (the same run's two medians),
and the spread of the per-repeat ratios (median, quartiles, min-max): a median ratio whose
quartiles straddle the goal is not a measurement of a cost.
"""
from __future__ import annotations

import argparse
import json
import statistics

import harness


def quartiles(values):
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return q[0], q[2]


def compare_interleaved(label, baseline, patched, positive, negative, latent, steps, cfg, repeats) -> dict:
    """Per-step time of plain CFG and SFG, same process, alternating order per repeat."""
    import torch

    for model in (baseline, patched):  # warm-up: weights loaded, kernels picked, caches filled
        harness.sample_seconds(model, positive, negative, latent, 2, cfg)
    base_times, patched_times, ratios = [], [], []
    for r in range(repeats):
        order = (baseline, patched) if r % 2 == 0 else (patched, baseline)
        seconds = {id(m): harness.sample_seconds(m, positive, negative, latent, steps, cfg) / steps for m in order}
        base_times.append(seconds[id(baseline)])
        patched_times.append(seconds[id(patched)])
        ratios.append(seconds[id(patched)] / seconds[id(baseline)])
    base, mod = statistics.median(base_times), statistics.median(patched_times)
    q1, q3 = quartiles(ratios)
    result = {"label": label, "baseline_s_per_step": base, "patched_s_per_step": mod, "ratio": mod / base,
              "pair_ratio_median": statistics.median(ratios), "pair_ratio_q1": q1, "pair_ratio_q3": q3,
              "pair_ratio_min": min(ratios), "pair_ratio_max": max(ratios), "pair_ratios": ratios,
              "baseline_it_s": 1.0 / base, "patched_it_s": 1.0 / mod, "steps": steps, "repeats": repeats,
              "latent": tuple(latent.shape), "device": str(torch.device("cuda") if torch.cuda.is_available() else "cpu")}
    print(f"{label:<48} CFG {base * 1000:8.2f} ms/step   SFG {mod * 1000:8.2f} ms/step   ratio {mod / base:5.3f}x   "
          f"per-repeat ratios: median {result['pair_ratio_median']:5.3f}, quartiles {q1:5.3f}-{q3:5.3f}, "
          f"range {min(ratios):5.3f}-{max(ratios):5.3f}   [{result['device']}, latent {tuple(latent.shape)}, "
          f"{steps} steps, {repeats} interleaved repeats]", flush=True)
    return result


def sd15_full_size(dtype):
    """SD1.5's UNet topology (860M parameters) with seeded random weights."""
    import torch

    config = harness.tiny_models.sd15_unet_config(model_channels=320, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                                                  transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                                                  transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                                                  num_heads=8)
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.SD15(config)
    model_config.set_inference_dtype(dtype, dtype)
    model = model_config.get_model({})
    harness.tiny_models.seeded_init(model.diffusion_model, 0)
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=torch.device("cpu"))


def dit_full_size(kind: str, dtype):
    """SD3-medium (MMDiT depth 24, 2B) or Flux-dev (19 double + 38 single blocks, 12B) topology with
    seeded random weights, built on the compute device in `dtype` (12B float32 weights would not fit in RAM)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    device = comfy.model_management.get_torch_device()
    if kind == "sd3":
        config_cls = comfy.supported_models.SD3
        config = {"in_channels": 16, "pos_embed_scaling_factor": None, "patch_size": 2, "out_channels": 16, "depth": 24,
                  "adm_in_channels": 2048, "context_embedder_config": {"target": "torch.nn.Linear",
                                                                       "params": {"in_features": 4096, "out_features": 1536}},
                  "num_patches": 36864, "pos_embed_max_size": 192, "x_block_self_attn_layers": []}
    else:
        config_cls = comfy.supported_models.Flux
        config = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
                  "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
                  "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
    model_config = config_cls(config)
    model_config.set_inference_dtype(dtype, dtype)
    model = model_config.get_model({}, device=device)
    harness.tiny_models.seeded_init_all(model.diffusion_model.to(device=device, dtype=dtype), 0)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def dit_prompts(kind: str, full_size: bool, glue):
    """SD3: 154 context tokens (CLIP-L/G 77 + T5 77); Flux: 256 T5 tokens. A real T5 word map for the
    prompt, from ComfyUI's tokenizers (the tiny encoders would not give full-size widths)."""
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip
    import torch

    tokenizer = comfy.text_encoders.sd3_clip.SD3Tokenizer() if kind == "sd3" else comfy.text_encoders.flux.FluxTokenizer()
    width = 4096 if (full_size or kind == "sd3") else harness.tiny_models.FLUX_CONTEXT_DIM
    pooled = 2048 if kind == "sd3" else (768 if full_size else 32)
    out = []
    for seed, text in ((1, "a cute maltese white dog next to a cat"), (2, "blurry, low quality")):
        tokens = tokenizer.tokenize_with_weights(text)
        length = 154 if kind == "sd3" else 256
        g = torch.Generator().manual_seed(seed)
        extra = {"pooled_output": torch.randn(1, pooled, generator=g), glue.TOKEN_MAP_KEY: glue.token_map_from_tokens(tokenizer, tokens, length)}
        if kind == "flux":
            extra["guidance"] = 3.5
        out.append([[torch.randn(1, length, width, generator=g), extra]])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", choices=["tiny", "sd15", "tiny-sd3", "tiny-flux", "sd3", "flux"], default="tiny")
    parser.add_argument("--size", type=int, default=64, help="image size in pixels (latent = size / 8)")
    parser.add_argument("--depth", type=int, default=0,
                        help="tiny-sd3 / tiny-flux: blocks (SD3: hidden 64·depth; Flux: depth double + depth single "
                             "blocks, hidden 32·depth); 0 = the tests' tiny models (2)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=None, help="interleaved CFG/SFG pairs per row (default 5; 15 on the tiny DiTs)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--gpu", action="store_true", help="use the GPU if there is one")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    env = harness.comfy_env(cpu=not args.gpu)
    import torch

    glue = env.module("nodes.glue")
    dtype = torch.float16 if args.gpu and torch.cuda.is_available() else torch.float32
    if args.repeats is None:
        args.repeats = 15 if args.unet in ("tiny-sd3", "tiny-flux") else 5
    if args.unet in ("tiny-sd3", "tiny-flux", "sd3", "flux"):
        return dit_main(args, glue, torch)
    model = sd15_full_size(dtype) if args.unet == "sd15" else harness.tiny_models.tiny_model("sd15", seed=0)
    clip = glue.clip_with_token_maps(harness.tiny_models.tiny_clip(seed=2))
    positive = harness.tiny_models.encode(clip, "a cute maltese white dog next to a cat")
    negative = harness.tiny_models.encode(clip, "blurry, low quality")
    latent = torch.zeros(args.batch, 4, args.size // 8, args.size // 8)
    print(f"segmentation-free guidance vs CFG, {args.unet} UNet, {args.size}x{args.size}, batch {args.batch}")
    results = []
    for start in (0.0, 0.4):
        patched = glue.apply_segfree_guidance(model, glue.SegfreeSettings(start_percent=start), "benchmark")
        results.append(harness.compare_sampling(f"SFG (start_percent {start}) vs CFG", model, patched, positive, negative,
                                                latent, steps=args.steps, cfg=7.5, repeats=args.repeats))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def dit_main(args, glue, torch):
    kind = args.unet.replace("tiny-", "")
    full_size = not args.unet.startswith("tiny")
    gpu = args.gpu and torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu else torch.float32
    if full_size:
        model = dit_full_size(kind, dtype)
    elif kind == "sd3":  # ComfyUI's MMDiT: hidden size 64·depth, depth heads
        model = harness.tiny_models.tiny_sd3(seed=0, depth=args.depth or 2)
    else:
        depth = args.depth or 2
        model = harness.tiny_models.tiny_flux(seed=0, guidance_embed=True, depth=depth, depth_single_blocks=depth,
                                              hidden_size=64 * max(depth // 2, 1), num_heads=max(depth // 2, 1))
    positive, negative = dit_prompts(kind, full_size, glue)
    latent = torch.zeros(args.batch, 16, args.size // 8, args.size // 8)
    print(f"segmentation-free guidance vs CFG, {args.unet}, {args.size}x{args.size}, batch {args.batch}, {dtype}")
    results = []
    variants = [(0.0, False), (0.4, False)] + ([(0.0, True)] if kind == "flux" else [])
    for start, single in variants:
        settings = glue.SegfreeSettings(start_percent=start, single_blocks=single)
        patched = glue.apply_segfree_guidance(model, settings, "benchmark")
        label = f"SFG (start_percent {start}{', +single blocks' if single else ''}) vs CFG"
        results.append(compare_interleaved(label, model, patched, positive, negative, latent, args.steps, 3.5, args.repeats))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
