"""Per-step cost of segmentation-free guidance over plain CFG, same model, same run.

    python benchmarks/bench_segfree.py                     # tiny SD1 UNet, CPU
    python benchmarks/bench_segfree.py --unet sd15 --size 512 --gpu   # SD1.5-size UNet (random weights)

The paper claims "almost the same computational complexity" as CFG; the goal here is <= 1.10x.
Two SFG rows: every step edited (start_percent 0, the worst case) and the default switch (0.4).
"""
from __future__ import annotations

import argparse
import json

import harness


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--size", type=int, default=64, help="image size in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--gpu", action="store_true", help="use the GPU if there is one")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    env = harness.comfy_env(cpu=not args.gpu)
    import torch

    glue = env.module("nodes.glue")
    dtype = torch.float16 if args.gpu and torch.cuda.is_available() else torch.float32
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


if __name__ == "__main__":
    main()
