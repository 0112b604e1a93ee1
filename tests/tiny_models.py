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


def tiny_vae16(seed: int = 0):
    """A `comfy.sd.VAE` with the SD3/Flux latent layout (8x down, 16 channels) and few
    channels, built with ComfyUI's AutoencoderKL."""
    import comfy.sd

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.sd.VAE(sd={}, config={"params": {"embed_dim": 16, "ddconfig": ddconfig}})
    vae.latent_channels = 16  # ComfyUI sets this from a state dict; a config-built VAE keeps SD's 4
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


def seeded_init_all(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """seeded_init, and then every parameter no torch initialiser owns (comfy.ops leaves them
    as uninitialised memory, which may be finite garbage): 1-D ones are norm scales (set to 1),
    the others small normal values."""
    seeded_init(module, seed)
    owned = set()
    for sub in module.modules():
        if isinstance(sub, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.GroupNorm,
                            torch.nn.LayerNorm, torch.nn.Embedding)):
            owned.update(id(p) for p in sub.parameters(recurse=False))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in module.parameters():
            if id(p) not in owned:
                if p.dim() == 1:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module


def _patcher(model):
    import comfy.model_management
    import comfy.model_patcher

    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


FLUX_CONTEXT_DIM = 64  # the tiny T5's width (Flux takes T5 states as its context)
SD3_CONTEXT_DIM = 4096  # SD3 pads CLIP-L/G states to T5-XXL's width: its context is always 4096 wide
SD3_TINY_POOLED = 128  # the tiny SD3 encoders' pooled vector: CLIP-L 64 + CLIP-G 64


def tiny_flux(seed: int = 0, guidance_embed: bool = False, depth: int = 1, depth_single_blocks: int = 1, hidden_size: int = 64,
              num_heads: int = 2, dtype=torch.float32):
    """A Flux-family (double- and single-stream joint attention, 16-channel latents) ModelPatcher
    built with ComfyUI's own classes: `comfy.supported_models.Flux` (dev, distilled guidance
    embedding) when guidance_embed, FluxSchnell otherwise. Defaults: one block of each kind."""
    import comfy.supported_models

    head_dim = hidden_size // num_heads
    axes = [head_dim - 2 * (head_dim * 3 // 8), head_dim * 3 // 8, head_dim * 3 // 8]
    config = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": FLUX_CONTEXT_DIM,
              "hidden_size": hidden_size, "mlp_ratio": 2.0, "num_heads": num_heads, "depth": depth,
              "depth_single_blocks": depth_single_blocks, "axes_dim": axes, "theta": 10000, "patch_size": 2, "qkv_bias": True,
              "guidance_embed": guidance_embed}
    config_cls = comfy.supported_models.Flux if guidance_embed else comfy.supported_models.FluxSchnell
    model_config = config_cls(config)
    model_config.set_inference_dtype(dtype, dtype)
    model = model_config.get_model({})
    seeded_init_all(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    return _patcher(model)


def tiny_sd3(seed: int = 0, depth: int = 2, x_block_self_attn_layers=(), dtype=torch.float32, adm_in_channels: int = 2048):
    """An SD3-family MMDiT ModelPatcher (`comfy.supported_models.SD3`; joint attention in every
    block, 16-channel latents). ComfyUI's MMDiT has hidden size 64·depth and depth heads.
    x_block_self_attn_layers gives SD3.5-style blocks with an extra image self-attention.
    adm_in_channels: the pooled vector's width (2048 as SD3's CLIP-L + CLIP-G; SD3_TINY_POOLED
    for the tiny SD3 encoders of tiny_dit_clip)."""
    import comfy.supported_models

    hidden = 64 * depth
    config = {"in_channels": 16, "pos_embed_scaling_factor": None, "patch_size": 2, "out_channels": 16, "depth": depth,
              "adm_in_channels": adm_in_channels, "context_embedder_config": {"target": "torch.nn.Linear",
                                                                   "params": {"in_features": SD3_CONTEXT_DIM, "out_features": hidden}},
              "num_patches": 64 * 64, "pos_embed_max_size": 64, "x_block_self_attn": bool(x_block_self_attn_layers),
              "x_block_self_attn_layers": list(x_block_self_attn_layers), "qk_norm": "rms" if x_block_self_attn_layers else None}
    model_config = comfy.supported_models.SD3(config)
    model_config.set_inference_dtype(dtype, dtype)
    model = model_config.get_model({})
    seeded_init_all(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    return _patcher(model)


def _clip_config(width: int, layers: int, heads: int = 2) -> dict:
    return {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
            "eos_token_id": 49407, "hidden_act": "quick_gelu", "hidden_size": width, "initializer_factor": 1.0,
            "initializer_range": 0.02, "intermediate_size": 2 * width, "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": heads,
            "num_hidden_layers": layers, "pad_token_id": 1, "projection_dim": width, "torch_dtype": "float32",
            "vocab_size": 49408}


def _t5_config(width: int) -> dict:
    return {"d_ff": 64, "d_kv": 16, "d_model": width, "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True,
            "layer_norm_epsilon": 1e-06, "model_type": "t5", "num_heads": 2, "num_layers": 1,
            "relative_attention_num_buckets": 32, "vocab_size": 32128}


def tiny_dit_clip(kind: str, seed: int = 0):
    """A `comfy.sd.CLIP` with the real tokenizers of SD3 (`sd3`: CLIP-L, CLIP-G and T5-XXL
    tokenizers) or Flux (`flux`: CLIP-L and T5-XXL) and ComfyUI's own encoder classes
    (SD3ClipModel / FluxClipModel assemble the context exactly as for real weights), with small
    random encoders. SD3's T5 is 4096 wide (its context width is fixed), so that one is big-ish
    (a 131M-parameter embedding)."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip
    import comfy.text_encoders.t5

    def clip_part(width, layers, layer="hidden", layer_idx=-2, projected=False):
        return comfy.sd1_clip.SDClipModel(textmodel_json_config=_clip_config(width, layers), layer=layer, layer_idx=layer_idx,
                                          layer_norm_hidden_state=False, return_projected_pooled=projected,
                                          special_tokens={"start": 49406, "end": 49407, "pad": 49407})

    def t5_part(width):
        return comfy.sd1_clip.SDClipModel(textmodel_json_config=_t5_config(width), model_class=comfy.text_encoders.t5.T5,
                                          special_tokens={"end": 1, "pad": 0}, enable_attention_masks=False,
                                          return_attention_masks=False, model_options={"model_name": "t5xxl"})

    if kind == "sd3":
        class TinySD3Clip(comfy.text_encoders.sd3_clip.SD3ClipModel):
            def __init__(self, device="cpu", dtype=None, model_options={}):
                torch.nn.Module.__init__(self)
                self.dtypes = {dtype}
                self.clip_l = clip_part(64, 3)
                self.clip_g = clip_part(64, 3, projected=True)
                self.clip_g.special_tokens["pad"] = 0  # as SDXLClipG
                self.t5xxl = t5_part(SD3_CONTEXT_DIM)
                self.t5_attention_mask = False

        target_clip, tokenizer = TinySD3Clip, comfy.text_encoders.sd3_clip.SD3Tokenizer
    elif kind == "flux":
        class TinyFluxClip(comfy.text_encoders.flux.FluxClipModel):
            def __init__(self, device="cpu", dtype=None, model_options={}):
                torch.nn.Module.__init__(self)
                self.dtypes = {dtype}
                self.clip_l = clip_part(64, 1, layer="last", layer_idx=None)
                self.t5xxl = t5_part(FLUX_CONTEXT_DIM)

        target_clip, tokenizer = TinyFluxClip, comfy.text_encoders.flux.FluxTokenizer
    else:
        raise ValueError(kind)

    class Target:
        params = {}
        clip = target_clip

    Target.tokenizer = tokenizer
    clip = comfy.sd.CLIP(target=Target())
    # seeded_init_all: T5's RMSNorm scales belong to no torch initialiser and would stay
    # uninitialised memory (NaN after other tests had used that memory)
    seeded_init_all(clip.cond_stage_model, seed)
    return clip


def dit_conditioning(kind: str, text_seed: int, tokens: int | None = None, batch: int = 1):
    """Random conditioning of the shape SD3 (154 tokens x 4096, 2048 pooled) or Flux (256 x 64,
    pooled 32 for the tiny vec_in) contexts have, for model-only checks."""
    g = torch.Generator().manual_seed(text_seed)
    if kind == "sd3":
        return [[torch.randn(batch, tokens or 154, SD3_CONTEXT_DIM, generator=g), {"pooled_output": torch.randn(batch, 2048, generator=g)}]]
    return [[torch.randn(batch, tokens or 256, FLUX_CONTEXT_DIM, generator=g), {"pooled_output": torch.randn(batch, 32, generator=g)}]]


def tiny_clip_vision(folder, projection_dim: int = 768, layers: int = 2, patch_size: int = 16, seed: int = 4):
    """ComfyUI's ClipVisionModel at a tiny size (64 wide, 32 px images), seeded; its config is
    written into `folder` because ComfyUI builds it from a JSON file."""
    import json
    import pathlib

    import comfy.clip_vision

    config = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 64, "image_size": 32,
              "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 128, "layer_norm_eps": 1e-5,
              "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3,
              "num_hidden_layers": layers, "patch_size": patch_size, "projection_dim": projection_dim,
              "torch_dtype": "float32"}
    path = pathlib.Path(folder) / f"tiny_vision_{projection_dim}_{layers}_{patch_size}.json"
    path.write_text(json.dumps(config))
    vision = comfy.clip_vision.ClipVisionModel(str(path))
    seeded_init(vision.model, seed)
    return vision


# ---------------------------------------------------------------------------------------------
# Small images, masks and fingerprints for the tests

def box_mask(h, w, top, left, bottom, right, batch=1):
    """A MASK (batch, h, w): 1 inside the box, 0 outside."""
    m = torch.zeros(batch, h, w)
    m[:, top:bottom, left:right] = 1.0
    return m


def smooth_image(h, w, seed=0):
    """A smooth random IMAGE (1, h, w, 3) in [0, 1]: a bicubic blow-up of 4x4 random colours."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1).movedim(1, -1)


def fingerprint(*modules, patcher=None) -> str:
    """sha256 over modules' weights (as float32 bytes) and, given a ModelPatcher, the keys of its
    model options: equal fingerprints before and after mean nothing the user passed in was changed."""
    import hashlib

    h = hashlib.sha256()
    for module in modules:
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    if patcher is not None:
        h.update(repr(sorted(patcher.model_options.get("transformer_options", {}).keys())).encode())
        h.update(repr(sorted(patcher.model_options)).encode())
    return h.hexdigest()
