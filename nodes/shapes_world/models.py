"""Shapes-world model architectures and their build/load functions.

Three models, all in architectures ComfyUI or open_clip already implement, at small sizes:
  * VAE: ComfyUI's AutoencoderKL with SD's latent layout (8x down, 4 channels:
    128x128x3 -> 16x16x4), wrapped as a `comfy.sd.VAE`.
  * Dual encoder: an `open_clip.CLIP` (ModifiedResNet image tower, 3-layer 128-wide text
    transformer with the standard 49408-token CLIP BPE and 77-token context). Its text tower is
    converted to ComfyUI's `CLIPTextModel` (HF layout) and wrapped as a `comfy.sd.CLIP` with the
    real SD1 tokenizer, so CLIPTextEncode gives the token embeddings the UNet was trained on.
  * UNet: ComfyUI's own SD1-style UNet (eps prediction, SD1's discrete scaled-linear schedule)
    with small dims, through a `supported_models.SD15` subclass whose latent format carries the
    VAE's scale factor.

When a weights file is missing the builders fall back to seeded random weights of the same
architecture (the loader says so loudly). Everything runs on the GPU when ComfyUI picks one.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib

import torch

WEIGHTS_DIR = pathlib.Path(__file__).resolve().parents[2] / "models" / "shapes_world"
VAE_FILE, CLIP_FILE, UNET_FILE = "vae.safetensors", "clip.safetensors", "unet.safetensors"
# The text tower CLIPTextEncode uses, trained jointly with the UNet (open_clip text-tower keys);
# without it the dual encoder's own text tower is used.
TEXT_ENCODER_FILE = "text_encoder.safetensors"

IMAGE_SIZE = 128
LATENT_CHANNELS = 4
DEFAULT_SCALE_FACTOR = 1.0  # used by random weights; trained weights record theirs

VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 128, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}

CLIP_EMBED_DIM = 128
CLIP_VISION_CFG = {"image_size": IMAGE_SIZE, "layers": [1, 1, 1, 1], "width": 32, "head_width": 32}
CLIP_TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3}
# open_clip's defaults (OpenAI's normalisation) for the image tower's input
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ComfyUI CLIPTextModel config equal to the open_clip text tower above (nn.GELU -> "gelu").
COMFY_TEXT_CONFIG = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 49407, "hidden_act": "gelu", "hidden_size": CLIP_TEXT_CFG["width"], "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 4 * CLIP_TEXT_CFG["width"], "layer_norm_eps": 1e-05,
    "max_position_embeddings": CLIP_TEXT_CFG["context_length"], "model_type": "clip_text_model",
    "num_attention_heads": CLIP_TEXT_CFG["heads"], "num_hidden_layers": CLIP_TEXT_CFG["layers"], "pad_token_id": 1,
    "projection_dim": CLIP_EMBED_DIM, "torch_dtype": "float32", "vocab_size": CLIP_TEXT_CFG["vocab_size"],
}

UNET_CONFIG = {
    "image_size": IMAGE_SIZE // 8, "in_channels": 4, "out_channels": 4, "model_channels": 64,
    "num_res_blocks": [1, 1, 1], "channel_mult": [1, 2, 2], "transformer_depth": [1, 1, 1],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1], "transformer_depth_middle": 1,
    "context_dim": CLIP_TEXT_CFG["width"], "use_spatial_transformer": True, "use_linear_in_transformer": False,
    "adm_in_channels": None, "use_temporal_attention": False,
}


# ---------------------------------------------------------------------------------------------
# helpers

def seeded_init(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-run torch's default initialisers under a fixed seed (`comfy.ops` skips them)."""
    inits = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.GroupNorm,
             torch.nn.LayerNorm, torch.nn.Embedding, torch.nn.BatchNorm2d)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            for sub in module.modules():
                for cls in type(sub).__mro__:
                    if cls in inits:
                        cls.reset_parameters(sub)
                        break
            for p in module.parameters():
                if not torch.isfinite(p).all():
                    p.normal_(0.0, 0.02)
    finally:
        torch.random.set_rng_state(state)
    return module


def read_record(path: pathlib.Path) -> dict:
    """The training record (JSON) beside a weights file, or {}."""
    rec = path.with_suffix(".json")
    return json.loads(rec.read_text()) if rec.exists() else {}


def load_weights(path: pathlib.Path) -> dict[str, torch.Tensor]:
    import safetensors.torch
    return {k: v.float() for k, v in safetensors.torch.load_file(str(path)).items()}


def save_weights(sd: dict[str, torch.Tensor], path: pathlib.Path, fp16: bool = True, metadata: dict | None = None):
    """Safetensors, fp16 by default (the shipped files stay small); float32 on load."""
    import safetensors.torch
    out = {k: (v.detach().to(torch.float16) if fp16 and v.is_floating_point() else v.detach()).contiguous().cpu()
           for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(out, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})


# ---------------------------------------------------------------------------------------------
# VAE

def vae_config(ddconfig: dict | None = None) -> dict:
    """AutoencoderKL's config: the default architecture, or the one a weights record names."""
    return {"params": {"embed_dim": LATENT_CHANNELS, "ddconfig": dict(ddconfig or VAE_DDCONFIG)}}


def vae_ddconfig_of(weights_file: pathlib.Path) -> dict:
    """The architecture a VAE weights file was trained with (its record), else the default."""
    return dict(read_record(weights_file).get("ddconfig") or VAE_DDCONFIG)


def build_autoencoder(seed: int = 0, ddconfig: dict | None = None):
    """The bare `comfy.ldm.models.autoencoder.AutoencoderKL` (trainable in plain torch)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL
    return seeded_init(AutoencoderKL(**vae_config(ddconfig)["params"]), seed)


def build_vae(state_dict: dict | None = None, seed: int = 0, ddconfig: dict | None = None):
    """A `comfy.sd.VAE` (what VAEEncode/VAEDecode take); random seeded weights if no state dict."""
    import comfy.sd
    sd = dict(state_dict) if state_dict else build_autoencoder(seed, ddconfig).state_dict()
    return comfy.sd.VAE(sd=sd, config=vae_config(ddconfig), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Dual encoder (open_clip) and its ComfyUI text encoder

def build_open_clip(state_dict: dict | None = None, seed: int = 0):
    import open_clip
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = open_clip.CLIP(embed_dim=CLIP_EMBED_DIM, vision_cfg=dict(CLIP_VISION_CFG), text_cfg=dict(CLIP_TEXT_CFG))
    finally:
        torch.random.set_rng_state(state)
    if state_dict:
        model.load_state_dict(state_dict)
    return model.eval()


def text_tower_state_dict(open_clip_model) -> dict[str, torch.Tensor]:
    """open_clip's text tower in ComfyUI/HF CLIPTextModel key layout (keys start with
    'text_model.' plus 'text_projection.weight')."""
    import comfy.utils
    keys = ("token_embedding.", "positional_embedding", "ln_final.", "transformer.", "text_projection")
    sd = {k: v.detach().clone().float() for k, v in open_clip_model.state_dict().items() if k.startswith(keys)}
    return comfy.utils.clip_text_transformers_convert(sd, "", "")


def build_comfy_clip(open_clip_model, dtype=torch.float32):
    """A `comfy.sd.CLIP` (real SD1 tokenizer, ComfyUI CLIPTextModel) holding open_clip's text tower."""
    import comfy.sd
    import comfy.sd1_clip

    class ShapesWorldClipL(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            super().__init__(device=device, dtype=dtype, textmodel_json_config=COMFY_TEXT_CONFIG,
                             model_options=model_options, layer="last",
                             special_tokens={"start": 49406, "end": 49407, "pad": 49407},
                             return_projected_pooled=False)

    class ShapesWorldClipModel(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=ShapesWorldClipL)

    class Target:
        params = {}
        clip = ShapesWorldClipModel
        tokenizer = comfy.sd1_clip.SD1Tokenizer

    clip = comfy.sd.CLIP(target=Target(), model_options={"dtype": dtype})
    missing, unexpected = clip.load_sd(text_tower_state_dict(open_clip_model))
    missing = [k for k in missing if not k.endswith("position_ids") and "logit_scale" not in k]
    if missing or unexpected:
        raise RuntimeError(f"text tower conversion mismatch: missing {missing}, unexpected {unexpected}")
    return clip


def open_clip_token_embeddings(model, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's text tower up to its final LayerNorm: one embedding per token (B, 77, width)."""
    x = model.token_embedding(tokens) + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    return model.ln_final(x)


class ShapesWorldCLIP:
    """The dual encoder as the pack's MC_CLIP type: an open_clip model with its preprocessing.

    encode_image(images BHWC float in [0, 1]) -> L2-normalised features (B, embed_dim)
    encode_text(list of str) -> L2-normalised features (B, embed_dim)
    tokenize(list of str) -> token ids (B, 77) (open_clip's SimpleTokenizer: standard CLIP BPE)
    `model` is the open_clip.CLIP (its `visual` is a ModifiedResNet with spatial feature maps).
    """

    def __init__(self, model, device: torch.device | str = "cpu", name: str = "shapes_world", trained: bool = True):
        import open_clip
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.name = name
        self.trained = trained
        self.image_size = IMAGE_SIZE
        self.mean = CLIP_MEAN
        self.std = CLIP_STD
        self.embed_dim = CLIP_EMBED_DIM
        self.context_length = CLIP_TEXT_CFG["context_length"]
        self._tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=self.context_length)

    def __repr__(self):
        return f"ShapesWorldCLIP(name={self.name!r}, trained={self.trained}, device={self.device})"

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self._tokenizer(list(texts))

    def preprocess(self, images_bhwc: torch.Tensor) -> torch.Tensor:
        """BHWC [0, 1] -> normalised BCHW at image_size (bilinear resize if needed)."""
        x = images_bhwc[..., :3].movedim(-1, 1).to(self.device, torch.float32)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = torch.nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                                antialias=True, align_corners=False)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def encode_image(self, images_bhwc: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.model.encode_image(self.preprocess(images_bhwc)), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenize(texts).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_text(tokens), dim=-1)


# ---------------------------------------------------------------------------------------------
# UNet

def supported_model_class(scale_factor: float):
    """A `comfy.supported_models.SD15` subclass with the shapes-world UNet size and latent scale."""
    import comfy.latent_formats
    import comfy.supported_models

    class ShapesWorldLatent(comfy.latent_formats.SD15):
        def __init__(self):
            super().__init__(scale_factor=scale_factor)
            self.taesd_decoder_name = None

    class ShapesWorldSD(comfy.supported_models.SD15):
        unet_config = {"context_dim": UNET_CONFIG["context_dim"], "model_channels": UNET_CONFIG["model_channels"],
                       "use_linear_in_transformer": False, "adm_in_channels": None, "use_temporal_attention": False}
        unet_extra_config = {"num_heads": 4, "num_head_channels": -1}
        latent_format = ShapesWorldLatent
        memory_usage_factor = 0.2

    return ShapesWorldSD


def build_base_model(scale_factor: float = DEFAULT_SCALE_FACTOR, state_dict: dict | None = None, seed: int = 0,
                     dtype=torch.float32):
    """ComfyUI's BaseModel (EPS, SD1 discrete schedule) holding the small UNet."""
    config = supported_model_class(scale_factor)(dict(UNET_CONFIG))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    if state_dict:
        model.diffusion_model.load_state_dict(state_dict)
    else:
        seeded_init(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    return model


def build_model_patcher(scale_factor: float = DEFAULT_SCALE_FACTOR, state_dict: dict | None = None, seed: int = 0):
    import comfy.model_management
    import comfy.model_patcher
    model = build_base_model(scale_factor, state_dict, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


# ---------------------------------------------------------------------------------------------
# The bundle the loader node returns

def weights_status(weights_dir: pathlib.Path = WEIGHTS_DIR) -> dict[str, bool]:
    return {name: (weights_dir / f).exists() for name, f in (("vae", VAE_FILE), ("clip", CLIP_FILE), ("unet", UNET_FILE))}


def load_bundle(weights: str = "trained", seed: int = 0, weights_dir: pathlib.Path | str | None = None) -> dict:
    """MODEL (ModelPatcher), CLIP (comfy.sd.CLIP), VAE (comfy.sd.VAE) and MC_CLIP (ShapesWorldCLIP).

    weights="trained" loads the shipped files and falls back, per model, to seeded random
    weights when a file is missing; weights="random" always uses seeded random weights.
    Returns {"model", "clip", "vae", "mc_clip", "trained": {name: bool}, "scale_factor"}."""
    import comfy.model_management
    weights_dir = pathlib.Path(weights_dir or os.environ.get("MC_SHAPES_WORLD_WEIGHTS", WEIGHTS_DIR))
    use = weights_status(weights_dir) if weights == "trained" else {"vae": False, "clip": False, "unet": False}

    vae_sd = load_weights(weights_dir / VAE_FILE) if use["vae"] else None
    vae = build_vae(vae_sd, seed=seed, ddconfig=vae_ddconfig_of(weights_dir / VAE_FILE) if use["vae"] else None)
    scale = float(read_record(weights_dir / VAE_FILE).get("scale_factor", DEFAULT_SCALE_FACTOR)) if use["vae"] \
        else DEFAULT_SCALE_FACTOR

    clip_sd = load_weights(weights_dir / CLIP_FILE) if use["clip"] else None
    oc = build_open_clip(clip_sd, seed=seed + 1)
    text_oc = oc
    if use["clip"] and weights == "trained" and (weights_dir / TEXT_ENCODER_FILE).exists():
        text_oc = build_open_clip(clip_sd, seed=seed + 1)
        text_oc.load_state_dict(load_weights(weights_dir / TEXT_ENCODER_FILE), strict=False)
    clip = build_comfy_clip(text_oc)
    mc_clip = ShapesWorldCLIP(oc, device=comfy.model_management.get_torch_device(), trained=use["clip"])

    unet_sd = load_weights(weights_dir / UNET_FILE) if use["unet"] else None
    if use["unet"]:
        scale = float(read_record(weights_dir / UNET_FILE).get("scale_factor", scale))
    model = build_model_patcher(scale, unet_sd, seed=seed + 2)

    for name, ok in use.items():
        if not ok:
            logging.warning("[More Control] shapes world %s: UNTRAINED random weights (seed %d)%s", name, seed,
                            "" if weights == "random" else f"; no {weights_dir / {'vae': VAE_FILE, 'clip': CLIP_FILE, 'unet': UNET_FILE}[name]}")
    return {"model": model, "clip": clip, "vae": vae, "mc_clip": mc_clip, "trained": use, "scale_factor": scale}
