"""Tiny models for the semantic-guidance tests: a seeded open_clip CLIP (ModifiedResNet tower, 64 px,
the SDG paper's architecture family) as an MC_CLIP, and an untrained noise-aware encoder for the
tiny SD1 latent space. Nothing is downloaded."""
from __future__ import annotations

import torch

TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_mc_clip(clip_models, seed: int = 5):
    """An OpenCLIPModel (the pack's MC_CLIP for open_clip models) with seeded random weights."""
    import open_clip

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = open_clip.CLIP(**TINY_CLIP_CONFIG)
        # A random ModifiedResNet embeds every image alike (cosines ~1): its BatchNorms' default
        # statistics do not fit the activations, which fade to a constant. Statistics measured on
        # a few images (as training would leave them) keep images apart.
        visual = model.visual
        for m in visual.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # a plain average over the calibration batches
        visual.train()
        with torch.no_grad():
            images = torch.cat([reference_images(8, 64, seed + 1), torch.rand(8, 64, 64, 3)])
            mean = torch.tensor(clip_models.OPENAI_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(clip_models.OPENAI_STD).view(1, 3, 1, 1)
            visual((images.movedim(-1, 1) - mean) / std)
        visual.eval()
    finally:
        torch.random.set_rng_state(state)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=TINY_CLIP_CONFIG["text_cfg"]["context_length"])
    return clip_models.OpenCLIPModel(model, tokenizer, "tiny-rn", config={**TINY_CLIP_CONFIG, "quick_gelu": False})


def tiny_encoder(glue, algo, clip_models, mc_clip, model_patcher, seed: int = 6, channels: int | None = None):
    """An untrained (seeded) noise-aware encoder for the model's latent format, FiLM randomised a
    little so the noise level matters."""
    latent_format = model_patcher.model.latent_format
    channels = channels or latent_format.latent_channels
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        encoder = algo.NoiseAwareEncoder(mc_clip.model.visual, channels)
        torch.nn.init.normal_(encoder.film[-1].weight, std=0.01)
    finally:
        torch.random.set_rng_state(state)
    encoder.requires_grad_(False).eval()
    record = algo.EncoderRecord(vision_config=clip_models.vision_config(mc_clip), latent_channels=channels,
                                latent_format=type(latent_format).__name__, scale_factor=float(latent_format.scale_factor),
                                trained_from="tiny-rn")
    return glue.NoiseAwareEncoderFile(encoder, record, "tiny_encoder")


def reference_images(n: int, size: int = 64, seed: int = 8) -> torch.Tensor:
    """Smooth coloured images BHWC in [0, 1] (blobs, not noise: CLIP features of noise are flat)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1).movedim(1, -1)
