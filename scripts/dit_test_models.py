#!/usr/bin/env python3
"""Random-weight SD3 and Flux model files that ComfyUI 0.3.75's own loaders accept, for the
segfree_sd3 / segfree_flux workflows (tests and thumbnails). NOT trained: every weight is seeded noise.

    python scripts/dit_test_models.py MODELS_DIR [--only sd3|flux]

Files are written once into a cache (~/.cache/more-control/dit-test-models/v1) and linked into
MODELS_DIR/<folder>/ under the names the workflows load, which are the names of the files users have:

  sd3:  checkpoints/sd3_medium_incl_clips.safetensors   (MMDiT + CLIP-L + CLIP-G + VAE, no T5)
  flux: diffusion_models/flux1-dev.safetensors, text_encoders/clip_l.safetensors,
        text_encoders/t5xxl_fp8_e4m3fn.safetensors, vae/ae.safetensors

What ComfyUI's loaders force (comfy/sd.py, comfy/model_detection.py), so what cannot be tiny:
  * text encoders are built from ComfyUI's fixed configs whatever the file holds (CLIP-L 12x768,
    CLIP-G 32x1280, T5-XXL 24x4096; load_state_dict would refuse other shapes, and missing
    weights would stay uninitialised memory), and a T5 file is only recognised with a block 23
    whose wi_1 is 4096 wide. They are full size here; T5-XXL in float8 (4.9 GB, as users' fp8 file).
  * a KL VAE is built as SD's (ch 128, mult 1-2-4-4, 2 res blocks); z_channels come from the file (16).
  * Flux's detector fixes 24 heads and axes 16+56+56, so hidden size 3072: the smallest Flux it
    accepts has one double- and one single-stream block (about 0.5 B parameters).
  * SD3's detector takes hidden 64·depth from the file: that MMDiT is tiny (depth 2).
"""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import time

PACK_DIR = pathlib.Path(__file__).resolve().parents[1]
CACHE = pathlib.Path(os.environ.get("MC_CACHE", pathlib.Path.home() / ".cache" / "more-control"))
COMFY_DIR = pathlib.Path(os.environ.get("MC_COMFYUI", CACHE / "ComfyUI"))
VERSION = "v1"  # bump when a file's content changes
STORE = CACHE / "dit-test-models" / VERSION

SD3_FILES = {"checkpoints": ["sd3_medium_incl_clips.safetensors"]}
FLUX_FILES = {"diffusion_models": ["flux1-dev.safetensors"], "vae": ["ae.safetensors"],
              "text_encoders": ["clip_l.safetensors", "t5xxl_fp8_e4m3fn.safetensors"]}
FILES = {"sd3": SD3_FILES, "flux": FLUX_FILES}


def log(msg: str) -> None:
    print(f"[dit_test_models] {msg}", flush=True)


def _comfy():
    """ComfyUI's modules in this process (CPU)."""
    if str(COMFY_DIR) not in sys.path:
        sys.path.insert(0, str(COMFY_DIR))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401


def seeded_state_dict(module, seed: int, dtype, prefix: str = "") -> dict:
    """A state dict for `module` (usually built on the meta device, so nothing full-size is
    allocated twice) with torch's default initialisation per layer kind, drawn tensor by tensor
    from a seeded generator: Linear/Conv weights and biases uniform in ±1/sqrt(fan_in),
    embeddings N(0, 1), norm scales 1 and norm shifts 0, anything else N(0, 0.02)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    out = {}
    for mod_name, mod in module.named_modules():
        weight = getattr(mod, "weight", None)
        fan_in = math.prod(weight.shape[1:]) if isinstance(weight, torch.Tensor) and weight.dim() >= 2 else None
        tensors = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        for name, t in tensors:
            key = f"{prefix}{mod_name}.{name}" if mod_name else f"{prefix}{name}"
            shape = tuple(t.shape)
            if isinstance(mod, norms) or (t.dim() == 1 and fan_in is None and name in ("weight", "scale")):
                value = torch.ones(shape) if name in ("weight", "scale") else torch.zeros(shape)
            elif isinstance(mod, torch.nn.Embedding):
                value = torch.randn(shape, generator=g)
            elif fan_in is not None and name in ("weight", "bias"):
                bound = 1.0 / math.sqrt(fan_in)
                value = torch.rand(shape, generator=g) * (2 * bound) - bound
            elif t.dim() == 1 and name.endswith("scale"):
                value = torch.ones(shape)
            else:
                value = torch.randn(shape, generator=g) * 0.02
            target = (dtype(key, value) if callable(dtype) else dtype) if t.is_floating_point() else t.dtype
            out[key] = value.to(target)
    return out


def _checked(module, sd: dict, prefix: str = "") -> dict:
    """Every key the module saves is there with its shape (a missing one would load as uninitialised memory)."""
    expected = {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    wrong = sorted(k for k in expected if k in sd and tuple(sd[k].shape) != expected[k])
    if missing or wrong:
        raise RuntimeError(f"state dict does not match the module: missing {missing[:5]}, wrong shape {wrong[:5]}")
    return {k: v for k, v in sd.items() if k in expected}


def clip_sd(kind: str, seed: int, dtype, prefix: str = "") -> dict:
    """CLIP-L or CLIP-G text model at ComfyUI's own config (what CLIPLoader/checkpoints build)."""
    import torch
    import comfy.sd1_clip
    import comfy.sdxl_clip

    with torch.device("meta"):
        if kind == "l":
            model = comfy.sd1_clip.SDClipModel(dtype=dtype, device="meta")
        else:
            model = comfy.sdxl_clip.SDXLClipG(dtype=dtype, device="meta")
    sd = seeded_state_dict(model.transformer, seed, dtype, prefix)
    return _checked(model.transformer, sd, prefix)


def t5xxl_sd(seed: int, dtype) -> dict:
    """T5-XXL encoder at ComfyUI's t5_config_xxl.json, weights cast to `dtype` (float8 here)."""
    import torch
    import comfy.text_encoders.sd3_clip

    with torch.device("meta"):
        model = comfy.text_encoders.sd3_clip.T5XXLModel(dtype=dtype, device="meta")
    # Every tensor in float8, norms included: ComfyUI picks T5's weight dtype from
    # encoder.final_layer_norm.weight (a 16-bit norm would build the 9.5 GB float16 model). float8
    # keeps ~2 significant digits; uniform ±1/64 weights survive it. Cast tensor by tensor (float32
    # for all of T5 would be 19 GB, seeded_state_dict casts each tensor as it is drawn).
    return _checked(model.transformer, seeded_state_dict(model.transformer, seed, dtype))


def kl_vae_sd(seed: int, dtype, z_channels: int = 16, prefix: str = "") -> dict:
    """The KL VAE ComfyUI builds from any `decoder.conv_in.weight` file (SD's layout), 16 latent channels."""
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {'double_z': True, 'z_channels': z_channels, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
                'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}
    with torch.device("meta"):
        model = AutoencoderKL(ddconfig=ddconfig, embed_dim=z_channels)
    return _checked(model, seeded_state_dict(model, seed, dtype, prefix), prefix)


def sd3_checkpoint(path: pathlib.Path) -> None:
    """MMDiT (depth 2, hidden 128, 4096-wide context, 2048 pooled) + CLIP-L + CLIP-G + VAE, with the
    key prefixes of SD3's all-in-one checkpoints (model.diffusion_model., text_encoders.clip_l/g.transformer.,
    first_stage_model.)."""
    import torch
    import comfy.supported_models
    import comfy.utils

    config = {"in_channels": 16, "pos_embed_scaling_factor": None, "patch_size": 2, "out_channels": 16, "depth": 2,
              "adm_in_channels": 2048, "context_embedder_config": {"target": "torch.nn.Linear",
                                                                   "params": {"in_features": 4096, "out_features": 128}},
              "num_patches": 64 * 64, "pos_embed_max_size": 64, "x_block_self_attn_layers": []}
    model_config = comfy.supported_models.SD3(config)
    model_config.set_inference_dtype(torch.float32, None)
    with torch.device("meta"):
        net = model_config.get_model({}, device="meta").diffusion_model
    sd = _checked(net, seeded_state_dict(net, 10, torch.float32, "model.diffusion_model."), "model.diffusion_model.")
    sd.update(clip_sd("l", 11, torch.float16, "text_encoders.clip_l.transformer."))
    sd.update(clip_sd("g", 12, torch.float16, "text_encoders.clip_g.transformer."))
    sd.update(kl_vae_sd(13, torch.float16, prefix="first_stage_model."))
    comfy.utils.save_torch_file(sd, str(path), metadata={"mc_note": "random weights (More Control tests), not a trained model"})


def flux_dev_unet(path: pathlib.Path) -> None:
    """Flux-dev layout (guidance embedding, 4096-wide T5 context, 768 CLIP-L pooled) at the smallest
    size ComfyUI's detector accepts: hidden 3072 (24 heads x 128), one double and one single block. bfloat16."""
    import torch
    import comfy.supported_models
    import comfy.utils

    config = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
              "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1, "depth_single_blocks": 1,
              "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
    model_config = comfy.supported_models.Flux(config)
    model_config.set_inference_dtype(torch.bfloat16, None)
    with torch.device("meta"):
        net = model_config.get_model({}, device="meta").diffusion_model
    sd = _checked(net, seeded_state_dict(net, 20, torch.bfloat16))
    comfy.utils.save_torch_file(sd, str(path), metadata={"mc_note": "random weights (More Control tests), not a trained model"})


def write_store(which: str) -> None:
    import torch

    _comfy()
    writers = {"sd3": {"sd3_medium_incl_clips.safetensors": sd3_checkpoint},
               "flux": {"flux1-dev.safetensors": flux_dev_unet,
                        "ae.safetensors": lambda p: _save(kl_vae_sd(21, torch.float16), p),
                        "clip_l.safetensors": lambda p: _save(clip_sd("l", 22, torch.float16), p),
                        "t5xxl_fp8_e4m3fn.safetensors": lambda p: _save(t5xxl_sd(23, torch.float8_e4m3fn), p)}}[which]
    STORE.mkdir(parents=True, exist_ok=True)
    for name, write in writers.items():
        target = STORE / name
        if target.exists():
            continue
        t0 = time.time()
        partial = target.with_suffix(".partial")
        write(partial)
        partial.rename(target)
        log(f"wrote {target} ({target.stat().st_size / 1e6:.0f} MB, {time.time() - t0:.1f} s)")


def _save(sd: dict, path: pathlib.Path) -> None:
    import comfy.utils

    comfy.utils.save_torch_file(sd, str(path), metadata={"mc_note": "random weights (More Control tests), not a trained model"})


def install(models_dir: pathlib.Path, which=("sd3", "flux")) -> list[pathlib.Path]:
    """Make sure the files exist in the store and link them into models_dir/<folder>/."""
    import subprocess

    linked = []
    for kind in which:
        if not all((STORE / n).exists() for names in FILES[kind].values() for n in names):
            # in a process of its own: writing T5-XXL holds ~5 GB that the caller should not keep
            subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "--store-only", "--only", kind], check=True)
        for folder, names in FILES[kind].items():
            (models_dir / folder).mkdir(parents=True, exist_ok=True)
            for name in names:
                link = models_dir / folder / name
                if link.is_symlink() or link.exists():
                    if link.resolve() == (STORE / name).resolve():
                        linked.append(link)
                        continue
                    link.unlink()
                link.symlink_to(STORE / name)
                linked.append(link)
    return linked


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models_dir", type=pathlib.Path, nargs="?", help="a ComfyUI models folder")
    ap.add_argument("--store-only", action="store_true", help="only write the cached files")
    ap.add_argument("--only", choices=sorted(FILES), action="append", help="only this family (repeatable)")
    args = ap.parse_args(argv)
    if args.store_only or args.models_dir is None:
        for kind in args.only or FILES:
            write_store(kind)
        return 0
    for link in install(args.models_dir, tuple(args.only or FILES)):
        log(f"{link} -> {link.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
