"""The shapes-world CDD-ICM composer (issue 10): encoders, gated fusion and a conditional denoiser built
from ComfyUI's own UNetModel, started from the shapes-world text-to-image UNet.

Choices (the paper's next step for speed, and the InstructPix2Pix recipe, both allowed by the issue):
  * it works in the shapes-world VAE's latent space (128x128 images -> 4x16x16 latents), not pixels;
  * the denoiser is ComfyUI's UNetModel with the shapes-world UNet's dims and weights, plus
      - 4 extra input channels for the reference latent (x_t ++ reference, zero-initialised),
      - 4 extra output channels v for the learned variance (eq. 9, zero-initialised: rho = 1/2),
      - ComfyUI's 'sequential' label embedding fed the fused condition c in place of the class
        embedding (its last layer zero-initialised),
      - context tokens = the reference's 4x4 patch tokens (projected) ++ the instruction's 77 tokens,
        in every cross-attention layer (GLIDE-style);
    so before training the denoiser is exactly the text-to-image UNet (a test checks it);
  * the schedule is the shapes-world UNet's own (SD1 scaled-linear, 1000 steps), not the paper's
    cosine one: the starting weights were trained on it and every ComfyUI sampler then drives the
    composer unchanged. The learned variance and the VLB use the same betas.
  * encoders: the shapes-world dual encoder's towers (ModifiedResNet image tower, 3-layer text tower)
    with linear projections to d; the noisy-image encoder is a copy of the image tower with its own
    weights, reading x_t through a 1x1 convolution (4 -> 3 channels) and 8x nearest upsampling.
"""
from __future__ import annotations

import copy
import importlib.util
import pathlib
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import models

COMPOSER_FILE = "composer.safetensors"
EXTRA_CHANNELS = 4


def cdd_icm():
    """nodes/algorithms/cdd_icm.py (plain torch), whether this package is imported as part of the pack
    or as `mc_shapes_world` by the training commands."""
    name = "mc_cdd_icm"
    if name not in sys.modules:
        path = pathlib.Path(__file__).resolve().parents[1] / "algorithms" / "cdd_icm.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def unet_config(dim: int) -> dict:
    config = dict(models.UNET_CONFIG)
    config.update(in_channels=models.LATENT_CHANNELS + EXTRA_CHANNELS, out_channels=2 * models.LATENT_CHANNELS,
                  adm_in_channels=dim, num_classes="sequential")
    return config


def build_unet(dim: int, base_state: dict | None = None, seed: int = 0):
    """ComfyUI's UNetModel for the composer, from the shapes-world UNet's weights (zero-initialised
    extras) when `base_state` is given."""
    config = models.supported_model_class(models.DEFAULT_SCALE_FACTOR)(unet_config(dim))
    config.set_inference_dtype(torch.float32, None)
    unet = models.seeded_init(config.get_model({}).diffusion_model, seed)
    state = unet.state_dict()
    with torch.no_grad():
        if base_state is not None:
            for key, value in base_state.items():
                if key not in state:
                    continue
                if state[key].shape == value.shape:
                    state[key].copy_(value)
                elif key == "input_blocks.0.0.weight":
                    state[key].zero_()
                    state[key][:, :value.shape[1]].copy_(value)
                elif key in ("out.2.weight", "out.2.bias"):
                    state[key].zero_()
                    state[key][:value.shape[0]].copy_(value)
        last = [k for k in state if k.startswith("label_emb.") and k.endswith(".weight")][-1]
        state[last].zero_()
        state[last.replace(".weight", ".bias")].zero_()
    unet.load_state_dict(state)
    return unet


class Composer(nn.Module):
    """CDD-ICM on the shapes world. Images are BHWC or BCHW float in [0, 1] at 128x128; tokens are
    open_clip token ids (B, 77); latents are the VAE's scaled latents (B, 4, 16, 16)."""

    def __init__(self, open_clip_model, unet: nn.Module, dim: int = 128):
        super().__init__()
        algo = cdd_icm()
        self.dim = dim
        self.visual = open_clip_model.visual
        self.token_embedding = open_clip_model.token_embedding
        self.positional_embedding = open_clip_model.positional_embedding
        self.text_transformer = open_clip_model.transformer
        self.ln_final = open_clip_model.ln_final
        self.text_projection = open_clip_model.text_projection
        self.register_buffer("attn_mask", open_clip_model.attn_mask, persistent=False)
        embed = models.CLIP_EMBED_DIM
        with torch.no_grad():
            patch_channels = self._feature_map(torch.zeros(1, 3, models.IMAGE_SIZE, models.IMAGE_SIZE)).shape[1]
        context = models.UNET_CONFIG["context_dim"]
        self.image_proj = nn.Linear(embed, dim)
        self.text_proj = nn.Linear(embed, dim)
        self.patch_proj = nn.Linear(patch_channels, context)
        self.noisy_visual = copy.deepcopy(open_clip_model.visual)
        self.noisy_adapter = nn.Conv2d(models.LATENT_CHANNELS, 3, 1)
        self.noisy_proj = nn.Linear(embed, dim)
        self.fusion = algo.GatedFusion(dim)
        self.tau = algo.Temperature()
        self.noisy_tau = algo.Temperature()
        self.unet = unet
        self.register_buffer("mean", torch.tensor(models.CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(models.CLIP_STD).view(1, 3, 1, 1), persistent=False)

    # parameter groups: the CLIP backbones get lr * eta (the paper's backbone activity ratio). The text
    # tower's vocabulary table (49408 x 128, of which the shapes world reads a few dozen rows) stays
    # frozen at the shapes-world CLIP's: at lr * 1e-3 it would barely move, and leaving it out keeps
    # 12.6 MB of copied table out of the shipped file (see `shipped_state`).
    def backbone_parameters(self, noisy: bool = False) -> list[nn.Parameter]:
        if noisy:
            return list(self.noisy_visual.parameters())
        return (list(self.visual.parameters()) + [self.positional_embedding]
                + list(self.text_transformer.parameters()) + list(self.ln_final.parameters()) + [self.text_projection])

    def head_parameters(self) -> list[nn.Parameter]:
        return (list(self.image_proj.parameters()) + list(self.text_proj.parameters()) + list(self.patch_proj.parameters())
                + list(self.fusion.parameters()) + list(self.tau.parameters()))

    def noisy_head_parameters(self) -> list[nn.Parameter]:
        return list(self.noisy_adapter.parameters()) + list(self.noisy_proj.parameters()) + list(self.noisy_tau.parameters())

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        x = images if images.shape[1] == 3 else images[..., :3].movedim(-1, 1)
        if x.shape[-2:] != (models.IMAGE_SIZE, models.IMAGE_SIZE):
            x = F.interpolate(x, size=(models.IMAGE_SIZE,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return (x.float() - self.mean) / self.std

    def _feature_map(self, x: torch.Tensor, visual: nn.Module | None = None) -> torch.Tensor:
        visual = visual or self.visual
        x = visual.stem(x)
        return visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u [B, d], patch tokens [B, 16, context_dim])."""
        fmap = self._feature_map(self._pixels(images))
        pooled = self.visual.attnpool(fmap)
        return self.image_proj(pooled), self.patch_proj(fmap.flatten(2).transpose(1, 2))

    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(v [B, d], token embeddings [B, 77, width])."""
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.ln_final(self.text_transformer(x, attn_mask=self.attn_mask))
        pooled = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ self.text_projection
        return self.text_proj(pooled), x

    def condition(self, reference: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused condition c (eq. 1) and the cross-attention context (reference patch tokens ++ text tokens)."""
        u, patches = self.encode_image(reference)
        v, words = self.encode_text(tokens)
        return self.fusion(u, v), torch.cat([patches, words], dim=1)

    def target_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """E_img(z) of eq. 12: the reference image encoder on the target image."""
        return self.encode_image(images)[0]

    def noisy_embedding(self, xt: torch.Tensor) -> torch.Tensor:
        """The noisy-image encoder of N-ICM on x_t (latent)."""
        x = F.interpolate(self.noisy_adapter(xt), scale_factor=models.IMAGE_SIZE // xt.shape[-1], mode="nearest")
        fmap = self._feature_map(x, self.noisy_visual)
        return self.noisy_proj(self.noisy_visual.attnpool(fmap))

    def denoise(self, xt: torch.Tensor, t: torch.Tensor, reference_latent: torch.Tensor, condition: torch.Tensor,
                context: torch.Tensor) -> torch.Tensor:
        """(eps, v) [B, 8, h, w] from ComfyUI's UNetModel: input x_t ++ reference latent, y = c, context."""
        return self.unet(torch.cat([xt, reference_latent], dim=1), timesteps=t, context=context, y=condition)


FROZEN_FROM_CLIP = ("token_embedding.weight",)


def shipped_state(composer: nn.Module) -> dict[str, torch.Tensor]:
    """What a composer weights file holds: the state dict without the tensors that never train and are
    read from the shapes-world CLIP file when the composer is built (`FROZEN_FROM_CLIP`)."""
    return {k: v for k, v in composer.state_dict().items() if k not in FROZEN_FROM_CLIP}


def load_shipped_state(composer: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a composer weights file into a built composer: every tensor must fit, and only the
    `FROZEN_FROM_CLIP` ones may be absent. Raises ValueError saying what does not fit (a file from
    another composer width or an older layout) instead of half-loading it."""
    missing, unexpected = composer.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in FROZEN_FROM_CLIP]
    if missing or unexpected:
        raise ValueError(f"the composer weights do not fit this composer: {len(missing)} tensors missing "
                         f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")


def build_composer(bundle_dir: pathlib.Path | str | None = None, dim: int = 128, seed: int = 0,
                   use_trained: bool = True) -> Composer:
    """A composer started from the shapes-world dual encoder and UNet in `bundle_dir` (the shipped
    models by default); random seeded weights for any file missing or with use_trained=False.

    The encoders always start from the dual encoder (`clip.safetensors`), never from a separately
    trained `text_encoder.safetensors` beside it: the paper builds image and instruction encoders on
    one CLIP, ICM aligns the two, and the vocabulary table a shipped composer leaves out of its file
    (`FROZEN_FROM_CLIP`) must be the one it was trained with, whatever text encoder the UNet uses."""
    bundle_dir = pathlib.Path(bundle_dir or models.WEIGHTS_DIR)
    have = models.weights_status(bundle_dir) if use_trained else {"vae": False, "clip": False, "unet": False}
    oc = models.build_open_clip(models.load_weights(bundle_dir / models.CLIP_FILE) if have["clip"] else None, seed=seed + 1)
    base = models.load_weights(bundle_dir / models.UNET_FILE) if have["unet"] else \
        models.build_base_model(seed=seed + 2).diffusion_model.state_dict()
    unet = build_unet(dim, base, seed=seed + 3)
    with torch.random.fork_rng(devices=[]):  # the new heads' default initialisers, seeded
        torch.manual_seed(seed + 4)
        return Composer(oc, unet, dim)
