"""Semantic diffusion guidance (Liu, Park, Azadi, Zhang, Chopikyan, Hu, Shi, Rohrbach, Darrell,
WACV 2023, arXiv 2112.05744; ../shared/ALGORITHMS.md section 2 for the official code's choices).

Plain torch; nothing here knows ComfyUI. Equation numbers are the paper's.

Guidance functions, each returning one value per sample (B,), so that the gradient of their sum
is every sample's own gradient:
* eq. 6, text:       F = E'_I(x_t, t) · E_L(l)                    (cosine of L2-normalised embeddings)
* eq. 7, content:    F = E'_I(x_t, t) · E'_I(x'_t, t)
* eq. 8, structure:  F = -Σ_j ||f_j(x_t) - f_j(x'_t)||² / (C_j H_j W_j)
* eq. 9, style:      F = -Σ_j ||G(f_j(x_t)) - G(f_j(x'_t))||²_F, G the Gram matrix of ONE sample's
                     map (the official code's Gram spans the whole batch, mixing samples: not here)
* eq. 10, several:   F = Σ_k s_k F_k

The guided step (Alg. 1, eq. 5: mean + s Σ ∇F) in the denoised form samplers use:
    denoised' = denoised + σ² ∇_x F      (the scale s is inside F, eq. 10)
which is classifier guidance on the score (denoised - x)/σ²: every sampler then takes it.

The time-conditioned encoder E'_I (section 3.5): a copy of the CLIP image tower whose norm
layers (every BatchNorm of a ModifiedResNet's stem and bottlenecks but the shortcuts, as in the
official code; every LayerNorm of a ViT's blocks) are followed by FiLM, y = n(x)(1 + γ) + β,
with (γ, β) predicted from the noise level by an MLP whose last layer starts at zero, so training
starts from CLIP. Choices of ours, not the paper's:
* it is conditioned on the noise level σ itself (sinusoidal features of log σ), not on a discrete
  timestep, so it serves any sampler and schedule;
* it reads the diffusion model's noisy LATENT, as the UNet sees it (`calculate_input`: unit
  variance for eps/v models), through a latent stem that replaces the pixel stem (ResNet:
  conv1..avgpool; ViT: the patch embedding) and resamples the latent grid to the grid the tower's
  first stage expects. No VAE decode and no UNet backward pass is needed in the sampling loop;
* self-supervised fine-tune: the trainable encoder on noised latents against the frozen CLIP on
  the clean images, symmetric cross-entropy with a fixed logit scale of 100 (as the code).
"""
from __future__ import annotations

import copy
import json
import math
import pathlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Guidance functions (eqs. 6-10), per sample


def text_guidance(image_embedding: torch.Tensor, text_embedding: torch.Tensor) -> torch.Tensor:
    """Eq. 6: cosine of the image embedding (B, D) with the text embedding (1 or B, D) -> (B,)."""
    return (F.normalize(image_embedding, dim=-1) * F.normalize(text_embedding, dim=-1)).sum(-1)


def content_guidance(image_embedding: torch.Tensor, reference_embedding: torch.Tensor) -> torch.Tensor:
    """Eq. 7: cosine of the sample's and the reference's global embeddings -> (B,)."""
    return (F.normalize(image_embedding, dim=-1) * F.normalize(reference_embedding, dim=-1)).sum(-1)


def structure_guidance(maps: list[torch.Tensor], reference_maps: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 8: minus the mean squared difference of each chosen layer's spatial features (the mean
    over C_j H_j W_j is the paper's 1/(C_j H_j W_j)), summed over layers -> (B,)."""
    total = 0.0
    for f, r in zip(maps, reference_maps, strict=True):
        total = total - (f - r).pow(2).flatten(1).mean(1)
    return total


def gram(features: torch.Tensor) -> torch.Tensor:
    """Per-sample Gram matrix of a (B, C, H, W) map: F Fᵀ / (C H W) -> (B, C, C) (Johnson et al.)."""
    b, c = features.shape[:2]
    flat = features.reshape(b, c, -1)
    return flat @ flat.transpose(1, 2) / flat[0].numel()


def style_guidance(maps: list[torch.Tensor], reference_grams: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 9: minus the squared Frobenius distance of each sample's Gram matrices to the
    reference's, summed over layers -> (B,). Never across the batch."""
    total = 0.0
    for f, g in zip(maps, reference_grams, strict=True):
        total = total - (gram(f) - g).pow(2).flatten(1).sum(1)
    return total


def combine(values: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """Eq. 10: Σ s_k F_k (B,)."""
    return sum(scale * value for scale, value in values)


def guided_denoised(denoised: torch.Tensor, sigma: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Alg. 1 in denoised form: denoised + σ² ∇F, in denoised's dtype (the gradient is fp32)."""
    sigma = sigma.reshape(-1, *([1] * (denoised.dim() - 1))).to(gradient)
    return (denoised.float() + sigma.pow(2) * gradient).to(denoised.dtype)


def gaussian_denoiser_jacobian(sigma: torch.Tensor, dims: int, sigma_data: float = 1.0) -> torch.Tensor:
    """d x̂0 / d x_t of the ideal denoiser for Gaussian data of std sigma_data: σ_d² / (σ_d² + σ²),
    shaped to broadcast over a (B, ...) tensor of `dims` dimensions. Carries a gradient taken at the
    clean prediction back to x_t without a UNet backward pass (the 'decoded (fast)' mode); at low
    noise it is 1, at high noise it keeps σ² ∇F bounded."""
    sigma = sigma.float().reshape(-1, *([1] * (dims - 1)))
    return sigma_data ** 2 / (sigma_data ** 2 + sigma ** 2)


def fit_batch(reference: torch.Tensor, batch: int) -> torch.Tensor | None:
    """A reference batch of 1 serves every sample; of `batch`, one each; of a divisor of `batch`,
    repeated in order (as ComfyUI repeats a shorter batch). None when it fits no sample count."""
    n = reference.shape[0]
    if n == batch:
        return reference
    if n == 1 or batch % n == 0:
        return reference.repeat(batch // n, *([1] * (reference.dim() - 1)))
    return None


def parse_layers(text: str, count: int, default: list[int]) -> list[int]:
    """'1,2,3' -> [1, 2, 3] (stages of the image tower, 0-based); 'auto' or '' -> default.
    Raises ValueError naming the bad entry."""
    text = text.strip().lower()
    if text in ("", "auto"):
        return list(default)
    layers = []
    for part in text.replace(" ", "").split(","):
        if not part.lstrip("-").isdigit():
            raise ValueError(f"{part!r} is not a layer number")
        index = int(part)
        if not 0 <= index < count:
            raise ValueError(f"layer {index} does not exist (this image tower has layers 0 to {count - 1})")
        layers.append(index)
    return sorted(set(layers))


# ---------------------------------------------------------------------------------------------
# Spatial features of an open_clip image tower (the clean E_I)

def tower_kind(visual: nn.Module) -> str:
    """'resnet' for open_clip's ModifiedResNet (conv1..bn3 stem, layer1..4, attnpool), 'vit' for
    its VisionTransformer."""
    if all(hasattr(visual, n) for n in ("layer1", "layer4", "attnpool")):
        return "resnet"
    if hasattr(visual, "transformer") and hasattr(visual, "conv1") and hasattr(visual, "class_embedding"):
        return "vit"
    raise ValueError(f"unsupported image tower {type(visual).__name__} (an open_clip ModifiedResNet or VisionTransformer is needed)")


def stage_count(visual: nn.Module) -> int:
    """How many spatial stages `layers` may pick: ResNet 5 (0 = stem, 1-4 = layer1-layer4), ViT one per block."""
    return 5 if tower_kind(visual) == "resnet" else len(visual.transformer.resblocks)


def default_layers(visual: nn.Module, purpose: str) -> list[int]:
    """Style: every stage (the official code's stem + layer1-4); structure: the middle stages,
    which keep layout without pinning pixels (the paper leaves the set open)."""
    n = stage_count(visual)
    if tower_kind(visual) == "resnet":
        return [0, 1, 2, 3, 4] if purpose == "style" else [2, 3]
    return sorted({n // 4, n // 2, (3 * n) // 4}) if purpose == "style" else sorted({n // 2, (3 * n) // 4})


def tower_features(visual: nn.Module, pixels: torch.Tensor, layers: list[int]):
    """The tower's global embedding (unnormalised) and the spatial maps (B, C, H, W) of `layers`,
    differentiable."""
    if tower_kind(visual) == "resnet":
        # open_clip 3.x's ModifiedResNet.forward_intermediates stops after the last asked stage
        # even when not told to (then its attnpool fails): the stages are run here.
        maps = []
        x = pixels
        for i, stage in enumerate((visual.stem, visual.layer1, visual.layer2, visual.layer3, visual.layer4)):
            x = stage(x)
            if i in layers:
                maps.append(x)
        return visual.attnpool(x), maps
    out = visual.forward_intermediates(pixels, indices=list(layers) or [0], output_fmt="NLC")
    grid = visual.grid_size
    maps = [m.reshape(m.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2) for m in out["image_intermediates"]]
    return out["image_features"], (maps if layers else [])


# ---------------------------------------------------------------------------------------------
# The noise-aware (time-conditioned) encoder E'_I

NOISE_EMBED_DIM = 128


def noise_level_embedding(sigma: torch.Tensor, dim: int = NOISE_EMBED_DIM) -> torch.Tensor:
    """Sinusoidal features of log σ (B,) -> (B, dim): frequencies from 1/16 to 16 per unit of log σ,
    which separates SD's σ range (0.03-15) finely at every scale. σ = 0 counts as e^-8."""
    log_sigma = torch.log(sigma.float().clamp_min(math.exp(-8.0))).reshape(-1, 1)
    freqs = torch.exp(torch.linspace(math.log(1 / 16), math.log(16.0), dim // 2, device=log_sigma.device))
    angles = log_sigma * freqs
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class FiLMState:
    """The (γ, β) of every modulated norm for the current forward pass (a plain object, not a
    module: every FiLMNorm points to it without making the module tree cyclic)."""

    def __init__(self):
        self.params: list[tuple[torch.Tensor, torch.Tensor]] = []


class FiLMNorm(nn.Module):
    """y = norm(x) (1 + γ_σ) + β_σ, per sample and channel (channel dim 1 for conv maps, last for tokens)."""

    def __init__(self, norm: nn.Module, channels: int, index: int, state: FiLMState):
        super().__init__()
        self.norm, self.channels, self.index = norm, channels, index
        self.__dict__["state"] = state  # not a submodule

    def forward(self, x):
        y = self.norm(x)
        gamma, beta = self.state.params[self.index]
        if y.dim() == 4:
            shape = (y.shape[0], self.channels, 1, 1)
        else:
            shape = (y.shape[0],) + (1,) * (y.dim() - 2) + (self.channels,)
        return y * (1 + gamma.reshape(shape).to(y.dtype)) + beta.reshape(shape).to(y.dtype)


def _group_norm(channels: int) -> nn.GroupNorm:
    groups = math.gcd(channels, 8)
    return nn.GroupNorm(groups, channels)


class LatentStem(nn.Module):
    """Noisy latent (B, c_latent, h, w) -> the tower's first-stage input (B, width, grid, grid):
    conv, norm, SiLU, resample the centre square to the grid, conv, norm, then ReLU for a ResNet
    (whose stem ends in ReLU + avgpool) or nothing for a ViT (a linear patch embedding)."""

    def __init__(self, latent_channels: int, width: int, grid: int, relu_out: bool):
        super().__init__()
        hidden = max(width, 32)
        self.grid, self.relu_out = grid, relu_out
        self.conv_in = nn.Conv2d(latent_channels, hidden, 3, padding=1)
        self.norm_in = _group_norm(hidden)
        self.conv_mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.norm_mid = _group_norm(hidden)
        self.conv_out = nn.Conv2d(hidden, width, 3, padding=1)

    def forward(self, z):
        h, w = z.shape[-2:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        z = z[..., top:top + side, left:left + side]
        x = F.silu(self.norm_in(self.conv_in(z)))
        if side != self.grid:
            x = F.interpolate(x, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        x = F.silu(self.norm_mid(self.conv_mid(x)))
        x = self.conv_out(x)
        return F.relu(x) if self.relu_out else x


class NoiseAwareEncoder(nn.Module):
    """E'_I(x_t, σ): a copy of an open_clip image tower reading noisy latents (see the module doc).

    forward(latent_input, sigma, layers) -> (embedding (B, D) L2-normalised, [spatial maps of layers])
    `latent_input` is what the UNet reads (the model's `calculate_input(σ, x)`)."""

    def __init__(self, visual: nn.Module, latent_channels: int, hidden: int = 512):
        super().__init__()
        self.kind = tower_kind(visual)
        self.visual = copy.deepcopy(visual).float()
        self.latent_channels = int(latent_channels)
        self.state = FiLMState()
        targets: list[tuple[nn.Module, str, int]] = []  # (parent, attribute, channels)
        if self.kind == "resnet":
            width = self.visual.layer1[0].conv1.in_channels
            grid = self.visual.image_size // 4
            for layer in (self.visual.layer1, self.visual.layer2, self.visual.layer3, self.visual.layer4):
                for block in layer:
                    for name in ("bn1", "bn2", "bn3"):
                        targets.append((block, name, getattr(block, name).num_features))
            # the pixel stem (conv1..bn3, avgpool) gives way to the latent stem, kept as `conv1`
            for name in ("bn1", "conv2", "bn2", "conv3", "bn3", "avgpool"):
                setattr(self.visual, name, nn.Identity())
            self.visual.conv1 = LatentStem(self.latent_channels, width, grid, relu_out=True)
        else:
            width = self.visual.conv1.out_channels
            grid = self.visual.grid_size[0]
            for block in self.visual.transformer.resblocks:
                for name in ("ln_1", "ln_2"):
                    targets.append((block, name, getattr(block, name).normalized_shape[0]))
            self.visual.conv1 = LatentStem(self.latent_channels, width, grid, relu_out=False)  # _embeds() calls conv1
        targets += [(self.stem, "norm_in", self.stem.norm_in.num_channels),
                    (self.stem, "norm_mid", self.stem.norm_mid.num_channels)]
        self.film_channels = []
        for index, (parent, name, channels) in enumerate(targets):
            setattr(parent, name, FiLMNorm(getattr(parent, name), channels, index, self.state))
            self.film_channels.append(channels)
        self.film = nn.Sequential(nn.Linear(NOISE_EMBED_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                  nn.Linear(hidden, 2 * sum(self.film_channels)))
        nn.init.zeros_(self.film[-1].weight)  # identity modulation at the start: training starts from CLIP
        nn.init.zeros_(self.film[-1].bias)
        self.eval()

    @property
    def stem(self) -> LatentStem:
        return self.visual.conv1

    def stage_count(self) -> int:
        return stage_count(self.visual) if self.kind == "vit" else 5

    def train(self, mode: bool = True):
        """BatchNorm statistics stay CLIP's (eval) even while training: batches of noisy latents
        at mixed noise levels are not the statistics the tower was built on; FiLM adapts instead."""
        super().train(mode)
        for m in self.visual.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def _set_noise(self, sigma: torch.Tensor, batch: int, device):
        sigma = torch.as_tensor(sigma, device=device, dtype=torch.float32).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(batch)
        params = self.film(noise_level_embedding(sigma))
        chunks = params.split([2 * c for c in self.film_channels], dim=1)
        self.state.params = [tuple(c.chunk(2, dim=1)) for c in chunks]

    def forward(self, latent_input: torch.Tensor, sigma, layers: list[int] | None = None):
        if latent_input.shape[1] != self.latent_channels:
            raise ValueError(f"the encoder reads {self.latent_channels}-channel latents, got {latent_input.shape[1]} channels")
        layers = list(layers or [])
        x = latent_input.float()
        self._set_noise(sigma, x.shape[0], x.device)
        try:
            if self.kind == "resnet":
                maps = []
                x = self.stem(x)
                if 0 in layers:
                    maps.append(x)
                for i, stage in enumerate((self.visual.layer1, self.visual.layer2, self.visual.layer3, self.visual.layer4), 1):
                    x = stage(x)
                    if i in layers:
                        maps.append(x)
                embedding = self.visual.attnpool(x)
            else:
                embedding, maps = tower_features(self.visual, x, layers)
        finally:
            self.state.params = []
        return F.normalize(embedding, dim=-1), maps


# ---------------------------------------------------------------------------------------------
# Self-supervised fine-tune (section 3.5)

LOGIT_SCALE = 100.0


def contrastive_loss(noisy_embedding: torch.Tensor, clean_embedding: torch.Tensor,
                     logit_scale: float = LOGIT_SCALE) -> torch.Tensor:
    """Symmetric cross-entropy of the N noisy/clean pairs, both L2-normalised, fixed logit scale,
    the two directions summed (as the official code)."""
    a, b = F.normalize(noisy_embedding, dim=-1), F.normalize(clean_embedding, dim=-1)
    logits = logit_scale * a @ b.T
    target = torch.arange(a.shape[0], device=a.device)
    return F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)


# Our default weight of alignment_loss beside the contrastive loss (from the shapes-world probes:
# weight 1 still collapsed the embeddings, 100 kept them in CLIP's space); training_step's own
# default stays 0, the paper's loss.
ALIGNMENT_WEIGHT = 100.0


def alignment_loss(noisy_embedding: torch.Tensor, clean_embedding: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(E'_I(x_t), E_I(x_0)) over the pairs. Not in the paper: ours, for small batches.
    The contrastive loss only ranks each noisy embedding among the batch's clean ones, so with a few
    dozen pairs it can reach a low value while the embeddings drift away from the clean ones; guidance
    compares them with CLIP text and image embeddings (eqs. 6-7), so it needs them close, not only ranked."""
    a, b = F.normalize(noisy_embedding, dim=-1), F.normalize(clean_embedding, dim=-1)
    return (1 - (a * b).sum(-1)).mean()


def sample_sigmas(batch: int, sigma_table: torch.Tensor | None, sigma_min: float, sigma_max: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise levels for training: uniform over the model's discrete schedule (the paper's uniform
    t), or log-uniform between the extremes for continuous schedules."""
    if sigma_table is not None and sigma_table.numel() > 1:
        index = torch.randint(0, sigma_table.numel(), (batch,), generator=generator)
        return sigma_table.float().cpu()[index]
    u = torch.rand(batch, generator=generator)
    return torch.exp(math.log(sigma_min) + u * (math.log(sigma_max) - math.log(sigma_min)))


def make_optimizer(encoder: NoiseAwareEncoder, lr: float = 1e-4, weight_decay: float = 1e-3,
                   new_parts_lr_factor: float = 10.0) -> torch.optim.Optimizer:
    """AdamW with the paper's lr 1e-4 and weight decay 1e-3; every parameter trains (the code's
    'all'). The parts CLIP does not have (latent stem, FiLM MLP) learn `new_parts_lr_factor` times
    faster (ours: short runs on a CPU)."""
    new = {id(p) for m in (encoder.stem, encoder.film) for p in m.parameters()}
    groups = [{"params": [p for p in encoder.parameters() if p.requires_grad and id(p) not in new], "lr": lr},
              {"params": [p for p in encoder.parameters() if p.requires_grad and id(p) in new], "lr": lr * new_parts_lr_factor}]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def training_step(encoder: NoiseAwareEncoder, optimizer: torch.optim.Optimizer, noisy_input: torch.Tensor,
                  sigmas: torch.Tensor, clean_embedding: torch.Tensor, max_grad_norm: float = 1.0,
                  alignment_weight: float = 0.0) -> float:
    """One optimiser step of the self-supervised loss (plus `alignment_weight` x alignment_loss, 0 =
    the paper's loss alone); returns the loss."""
    encoder.train()
    embedding, _ = encoder(noisy_input, sigmas)
    loss = contrastive_loss(embedding, clean_embedding.detach())
    if alignment_weight:
        loss = loss + alignment_weight * alignment_loss(embedding, clean_embedding.detach())
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):  # a diverging step is skipped, never written into the weights
        encoder.eval()
        return float("nan")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(encoder.parameters(), max_grad_norm)
    optimizer.step()
    encoder.eval()
    return float(loss.detach())


def pixel_stem_features(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """What the clean tower's pixel stem gives its first stage (ResNet: conv1..avgpool; ViT: the
    patch embedding): the target of the latent stem's warm-up."""
    return visual.stem(pixels) if tower_kind(visual) == "resnet" else visual.conv1(pixels)


def stem_warmup_step(encoder: NoiseAwareEncoder, optimizer: torch.optim.Optimizer, clean_latent_input: torch.Tensor,
                     stem_target: torch.Tensor, sigma: float = 0.0) -> float:
    """A warm-up of ours, before the paper's fine-tune: the new latent stem regresses the pixel
    stem's output on clean latents (mean squared error, normalised by the target's variance), so
    that the fine-tune starts from an encoder that already reads latents as CLIP reads pixels."""
    encoder.train()
    encoder._set_noise(torch.full((clean_latent_input.shape[0],), float(sigma)), clean_latent_input.shape[0],
                       clean_latent_input.device)
    try:
        out = encoder.stem(clean_latent_input.float())
    finally:
        encoder.state.params = []
    target = stem_target.detach().float()
    loss = (out - target).pow(2).mean() / target.var().clamp_min(1e-8)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    encoder.eval()
    return float(loss.detach())


@dataclass
class EncoderRecord:
    """What a saved encoder must say about itself (safetensors metadata): the tower it copies and
    the latent space it reads, so that a mismatch is refused with a clear error."""
    vision_config: dict        # open_clip: {"embed_dim", "vision_cfg", "quick_gelu"}
    latent_channels: int
    latent_format: str         # the diffusion model's latent format class name (SD15, SDXL, SD3, ...)
    scale_factor: float
    trained_from: str = ""
    noise_embedding: str = f"sinusoidal log-sigma, {NOISE_EMBED_DIM} features"
    input_form: str = "model_sampling.calculate_input(sigma, x)"


def encoder_metadata(record: EncoderRecord, extra: dict | None = None) -> dict[str, str]:
    meta = {"mc_kind": "noise_aware_encoder", "vision_config": json.dumps(record.vision_config),
            "latent_channels": str(record.latent_channels), "latent_format": record.latent_format,
            "scale_factor": repr(float(record.scale_factor)), "trained_from": record.trained_from,
            "noise_embedding": record.noise_embedding, "input_form": record.input_form}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def save_encoder(encoder: NoiseAwareEncoder, record: EncoderRecord, path, fp16: bool = True, extra: dict | None = None):
    """Safetensors with the record in its metadata (fp16 by default: shipped files stay small)."""
    import safetensors.torch

    state = {k: (v.detach().half() if fp16 and v.is_floating_point() else v.detach()).contiguous().cpu()
             for k, v in encoder.state_dict().items()}
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, str(path), metadata=encoder_metadata(record, extra))


def read_metadata(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def read_encoder_record(path) -> EncoderRecord:
    meta = read_metadata(path)
    if meta.get("mc_kind") != "noise_aware_encoder":
        raise ValueError(f"{pathlib.Path(path).name} is not a noise-aware encoder file (no record in its metadata)")
    return EncoderRecord(vision_config=json.loads(meta["vision_config"]), latent_channels=int(meta["latent_channels"]),
                         latent_format=meta["latent_format"], scale_factor=float(meta["scale_factor"]),
                         trained_from=meta.get("trained_from", ""), noise_embedding=meta.get("noise_embedding", ""),
                         input_form=meta.get("input_form", ""))
