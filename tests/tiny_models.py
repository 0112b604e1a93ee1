"""Seeded tiny models built with ComfyUI's own classes (no downloads, no stand-ins).

The same classes run a user's real SD1.5 / SDXL checkpoint; only the sizes differ. Every
builder is deterministic for a given seed: `comfy.ops` leaves weights uninitialised, so the
torch initialisers are re-run under a fixed generator.
"""
from __future__ import annotations

import torch


def seeded_init(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-run torch's default initialisers (comfy.ops skips them) under a fixed seed."""
    inits = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.GroupNorm,
             torch.nn.LayerNorm, torch.nn.Embedding)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            for sub in module.modules():
                for cls in type(sub).__mro__:
                    if cls in inits:
                        cls.reset_parameters(sub)
                        break
            for name, p in module.named_parameters():
                if not torch.isfinite(p).all():  # anything no initialiser reached (e.g. raw Parameters)
                    p.normal_(0.0, 0.02)
    finally:
        torch.random.set_rng_state(state)
    return module


def sd15_unet_config(**overrides) -> dict:
    config = {
        "model_channels": 32, "in_channels": 4, "out_channels": 4, "num_res_blocks": [1, 1],
        "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
        "transformer_depth_middle": 1, "context_dim": 768, "use_spatial_transformer": True,
        "use_linear_in_transformer": False, "adm_in_channels": None, "use_temporal_attention": False,
        "num_heads": 4, "num_head_channels": -1, "image_size": 32,
    }
    config.update(overrides)
    return config


def tiny_model(kind: str = "sd15", seed: int = 0, dtype=torch.float32):
    """A ModelPatcher with an SD1.x (`sd15`), SD2.x (`sd21`, linear projections, 1024 context)
    or SDXL (`sdxl`: 2048 context from two encoders, `adm` pooled input) topology."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    if kind == "sd15":
        config_cls, unet = comfy.supported_models.SD15, sd15_unet_config()
    elif kind == "sd21":
        config_cls = comfy.supported_models.SD20
        unet = sd15_unet_config(model_channels=64, context_dim=1024, use_linear_in_transformer=True, num_head_channels=64, num_heads=-1)
    elif kind == "sdxl":
        config_cls = comfy.supported_models.SDXL
        unet = sd15_unet_config(model_channels=64, context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential",
                                num_head_channels=64, num_heads=-1)
    else:
        raise ValueError(kind)
    model_config = config_cls(unet)
    model_config.set_inference_dtype(dtype, dtype)
    model = model_config.get_model({})
    seeded_init(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def tiny_clip(seed: int = 0, layers: int = 1):
    """A `comfy.sd.CLIP` with the real SD1 tokenizer and a small random CLIP-L-width text encoder."""
    import comfy.sd
    import comfy.sd1_clip

    text_config = {
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
        "eos_token_id": 49407, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": 1024, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
        "num_hidden_layers": layers, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
        "vocab_size": 49408,
    }

    class TinyClipL(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            super().__init__(device=device, dtype=dtype, textmodel_json_config=text_config,
                             model_options=model_options, special_tokens={"start": 49406, "end": 49407, "pad": 49407},
                             return_projected_pooled=False)

    class TinyClipModel(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=TinyClipL)

    class Target:
        params = {}
        clip = TinyClipModel
        tokenizer = comfy.sd1_clip.SD1Tokenizer

    clip = comfy.sd.CLIP(target=Target())
    seeded_init(clip.cond_stage_model, seed)
    return clip


def tiny_vae(seed: int = 0):
    """A `comfy.sd.VAE` with SD's latent layout (8x down, 4 channels) and few channels."""
    import comfy.sd

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    config = {"params": {"embed_dim": 4, "ddconfig": ddconfig}}
    vae = comfy.sd.VAE(sd={}, config=config)
    seeded_init(vae.first_stage_model, seed)
    return vae


def encode(clip, text: str):
    """CLIPTextEncode's own path: tokenize, then encode with schedule support."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def sdxl_conditioning(text_seed: int, batch: int = 1, tokens: int = 77):
    """SDXL-shaped conditioning (2048-wide context, 1280 pooled) from a seeded generator: the
    tiny CLIP above is SD1-only, and the SDXL model needs only the shapes."""
    g = torch.Generator().manual_seed(text_seed)
    context = torch.randn(batch, tokens, 2048, generator=g)
    pooled = torch.randn(batch, 1280, generator=g)
    return [[context, {"pooled_output": pooled, "width": 64, "height": 64}]]


def tiny_flux(seed: int = 0):
    """A Flux-family (DiT, joint attention) ModelPatcher, small, for checks that refuse DiTs."""
    import comfy.model_patcher
    import comfy.supported_models

    config = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 64,
              "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
              "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": False}
    model = comfy.supported_models.Flux(config).get_model({})
    seeded_init(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
