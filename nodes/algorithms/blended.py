"""Blended Latent Diffusion (Avrahami, Fried, Lischinski, TOG 2023, arXiv 2206.02779) in plain torch.

Nothing here knows about ComfyUI. The pieces, with the part of the paper each implements:

* masks: thresholding and resizing (Alg. 1, `m_latent = downsample(m)`; the official code
  thresholds at 0.5), binary dilation, the progressive-shrinking schedule (Sec. 4.3, App. "Implementation
  details": kernels 3x3/5x5/7x7, four equal parts, most dilated first).
* the blend after a step (Alg. 1, `z_t <- z_fg * m + z_bg * (1 - m)` with `z_bg = noise(z_init, t)`).
* background reconstruction: decoder fine-tune (Eq. 2/3) and latent optimisation (Eq. 1), with the
  loss of the official code: mean-squared error over the edited region plus 100x over the background.
* pixel-level alternatives the paper compares against: pixel paste and Poisson blending.
* prediction ranking (Sec. 4.4): CLIP similarity between the masked edit and the prompt.

Images are BHWC in [0, 1] at the API (ComfyUI's IMAGE layout) unless a docstring says otherwise.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# Masks

def fit_masks(mask: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """Soft masks [batch, height, width] from a MASK of [H, W] or [B, H, W] (B == 1 or B == batch),
    resized bilinearly (as ComfyUI resizes noise masks) when their size differs. Raises ValueError
    for a batch that matches neither rule; the node turns it into a NodeInputError."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"expected a mask of shape [H, W] or [B, H, W], got {tuple(mask.shape)}")
    if mask.shape[0] not in (1, batch):
        raise ValueError(f"has {mask.shape[0]} masks for {batch} images: give one mask, or one per image")
    mask = mask.float()
    if mask.shape[-2:] != (height, width):
        mask = F.interpolate(mask[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    return mask.expand(batch, height, width).clone()


def binarize(mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """1 where mask >= threshold, else 0 (the official code thresholds soft masks at 0.5)."""
    return (mask >= threshold).to(mask.dtype if mask.is_floating_point() else torch.float32)


def dilate(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """Binary dilation of a {0,1} mask [..., H, W] with a kernel x kernel square of ones.

    A max-pool with stride 1 and padding kernel//2 is exactly binary dilation with a square
    structuring element (scipy's `binary_dilation` in the official code), and runs on any device."""
    if kernel <= 1:
        return mask
    if kernel % 2 == 0:
        raise ValueError(f"dilation kernels must be odd, got {kernel}")
    shape = mask.shape
    flat = mask.reshape(-1, 1, shape[-2], shape[-1])
    return F.max_pool2d(flat, kernel, stride=1, padding=kernel // 2).reshape(shape)


@dataclass(frozen=True)
class ShrinkSchedule:
    """Progressive mask shrinking (Sec. 4.3): stage s uses the mask dilated by `kernels[s]`
    (1 = the mask itself) for a share `parts[s] / sum(parts)` of the sampling steps.

    The paper's schedule is kernels (7, 5, 3, 1) over four equal parts."""
    kernels: tuple[int, ...] = (7, 5, 3, 1)
    parts: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)

    def __post_init__(self):
        if not self.kernels or len(self.kernels) != len(self.parts):
            raise ValueError("kernels and parts must be non-empty lists of the same length")
        if any(k < 1 or k % 2 == 0 for k in self.kernels):
            raise ValueError(f"kernels must be odd integers >= 1, got {list(self.kernels)}")
        if any(p <= 0 for p in self.parts):
            raise ValueError(f"parts must be positive, got {list(self.parts)}")

    def stage_of_step(self, step: int, total_steps: int) -> int:
        """The stage of step `step` (0-based) of `total_steps`: stage s covers the steps whose
        start fraction step/total lies in [sum(parts[:s]), sum(parts[:s+1])) / sum(parts).

        With four equal parts and 50 steps that gives 13/12/13/12 steps (the official code's
        `i // (N // 4 + 1)` gives 13/13/13/11); with 4 steps, one step per stage."""
        total = sum(self.parts)
        position = step / max(total_steps, 1) * total
        edge = 0.0
        for stage, part in enumerate(self.parts):
            edge += part
            if position < edge - 1e-9:
                return stage
        return len(self.parts) - 1

    def kernel_of_step(self, step: int, total_steps: int) -> int:
        return self.kernels[self.stage_of_step(step, total_steps)]


def parse_int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.replace(";", ",").split(",") if v.strip())


def parse_float_list(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.replace(";", ",").split(",") if v.strip())


def step_index(sigma: float, sigmas: torch.Tensor) -> int:
    """The step a model call at noise level `sigma` belongs to, given the run's schedule
    `sigmas` (decreasing, N+1 values for N steps). A call at sigmas[i] or between sigmas[i] and
    sigmas[i+1] (second-order samplers evaluate mid-step) belongs to step i."""
    levels = sigmas[:-1].float().cpu()
    tolerance = 1e-5 * max(float(levels.abs().max()), 1.0) if levels.numel() else 0.0
    count = int((levels >= float(sigma) - tolerance).sum())
    return min(max(count - 1, 0), max(levels.numel() - 1, 0))


def shrink_mask(mask: torch.Tensor, kernel: int, threshold: float) -> torch.Tensor:
    """The latent mask of one stage: thresholded, then dilated by `kernel`."""
    return dilate(binarize(mask, threshold), kernel)


# ---------------------------------------------------------------------------------------------
# The blend (Alg. 1)

def blend_background(z: torch.Tensor, mask: torch.Tensor, noised_source: torch.Tensor) -> torch.Tensor:
    """Alg. 1's blend: keep the generated latent inside the mask, the source latent noised to the
    same level outside it: `z * m + noise(z_init, t) * (1 - m)`.

    `torch.where` rather than arithmetic for binary masks, so that outside the mask the result is
    the noised source bit for bit (at the final step: the clean source latent itself)."""
    if bool(((mask == 0) | (mask == 1)).all()):
        return torch.where(mask > 0.5, z, noised_source)
    return z * mask + noised_source * (1.0 - mask)


class NoiseSource:
    """The background noise of each step: a fresh draw per step (the paper: `noise(z_init, t)` is
    a new sample at every t), or the same tensor every step (ComfyUI's built-in inpainting and the
    diffusers pipelines). Seeded and drawn on the CPU so results do not depend on the device.

    `batch_index` (a latent's positions in a larger batch, as ComfyUI's `prepare_noise` reads them)
    gives each image the fresh noise of its position: image k of a batch and the same image split off
    with batch_index [k] are sampled alike."""

    def __init__(self, first: torch.Tensor, seed: int, fresh: bool, batch_index: Sequence[int] | None = None):
        self.first = first
        self.fresh = fresh
        self.batch_index = None if batch_index is None else [int(i) for i in batch_index]
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed) + 0x5EED) if fresh else None
        self.draws = {0: first}

    def _draw(self) -> torch.Tensor:
        if self.batch_index is None:
            return torch.randn(self.first.shape, generator=self.generator, dtype=torch.float32, device="cpu")
        # one draw per position up to the largest, in order, as prepare_noise does; keep the latent's own
        per_position = [torch.randn((1, *self.first.shape[1:]), generator=self.generator, dtype=torch.float32, device="cpu")
                        for _ in range(max(self.batch_index) + 1)]
        return torch.cat([per_position[i] for i in self.batch_index])

    def for_step(self, step: int) -> torch.Tensor:
        """The noise of noise level `step` (the same tensor however often it is asked for: the blend
        after step i-1 and the model input of step i must see the same background)."""
        if not self.fresh:
            return self.first
        if step not in self.draws and step < max(self.draws):
            raise ValueError(f"the noise of step {step} was already released (steps are asked for in order)")
        while step not in self.draws:
            k = max(self.draws) + 1
            draw = self._draw()
            self.draws[k] = draw.to(self.first.device, self.first.dtype)
            for old in [j for j in self.draws if j < k - 1]:  # steps only look one level ahead: free the rest
                del self.draws[old]
        return self.draws[step]


# ---------------------------------------------------------------------------------------------
# Background reconstruction (Sec. 4.2)

def reconstruction_loss(decoded: torch.Tensor, edited_target: torch.Tensor, source: torch.Tensor,
                        mask: torch.Tensor, background_weight: float) -> torch.Tensor:
    """Eq. 3 with the official code's weighting:
    `MSE(D(z) * m, x_hat * m) + lambda * MSE(D(z) * (1 - m), x * (1 - m))`, means over all pixels,
    images BCHW in [-1, 1], m a binary mask [B, 1, H, W]."""
    foreground = F.mse_loss(decoded * mask, edited_target * mask)
    background = F.mse_loss(decoded * (1 - mask), source * (1 - mask))
    return foreground + background_weight * background


@dataclass
class ReconstructionResult:
    image: torch.Tensor            # BCHW in [-1, 1]
    latent: torch.Tensor | None    # the optimised latent (latent optimisation only)
    losses: list[float]


def _adam_steps(parameters: list, decode: Callable[[], torch.Tensor], target: torch.Tensor, source: torch.Tensor,
                mask: torch.Tensor, steps: int, lr: float, background_weight: float,
                on_step: Callable[[int], None] | None) -> list[float]:
    """Adam on `parameters` against the reconstruction loss of `decode()`; the losses per step."""
    optimizer = torch.optim.Adam(parameters, lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = reconstruction_loss(decode(), target, source, mask, background_weight)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(len(losses))
    return losses


def finetune_decoder(decoder: torch.nn.Module, parameters: Iterable[torch.nn.Parameter], latent: torch.Tensor,
                     source: torch.Tensor, mask: torch.Tensor, steps: int = 75, lr: float = 1e-4,
                     background_weight: float = 100.0, edited_target: torch.Tensor | None = None,
                     on_step: Callable[[int], None] | None = None) -> ReconstructionResult:
    """Decoder fine-tune (Eq. 2/3): optimise the decoder weights theta with Adam so that D_theta(z0)
    reproduces the source image x outside the mask and the original decode x_hat = D(z0) inside it.

    `decoder` maps a latent [1, C, h, w] to an image [1, 3, H, W] in [-1, 1] and must be a
    throw-away copy: its weights change. `parameters` are the ones optimised (the paper: the
    decoder's, not the post-quantisation convolution's). Call with gradients enabled. `on_step(i)` runs
    after each step (progress, cancellation)."""
    with torch.no_grad():
        target = decoder(latent) if edited_target is None else edited_target
    losses = _adam_steps(list(parameters), lambda: decoder(latent), target, source, mask, steps, lr, background_weight, on_step)
    with torch.no_grad():
        image = decoder(latent)
    return ReconstructionResult(image, None, losses)


def optimize_latent(decoder: torch.nn.Module, latent: torch.Tensor, source: torch.Tensor, mask: torch.Tensor,
                    steps: int = 75, lr: float = 0.1, background_weight: float = 100.0,
                    edited_target: torch.Tensor | None = None,
                    on_step: Callable[[int], None] | None = None) -> ReconstructionResult:
    """Latent optimisation (Eq. 1): the same loss, optimised over z with the decoder frozen.

    The paper states lr 1e-4 for both variants; the official code uses 0.1 here, and 1e-4 barely
    moves a latent in 75 Adam steps (each step moves a value by at most about lr), so 0.1 is the default."""
    with torch.no_grad():
        target = decoder(latent) if edited_target is None else edited_target
    z = latent.detach().clone().requires_grad_(True)
    losses = _adam_steps([z], lambda: decoder(z), target, source, mask, steps, lr, background_weight, on_step)
    with torch.no_grad():
        image = decoder(z)
    return ReconstructionResult(image, z.detach(), losses)


def throwaway_copy(module: torch.nn.Module, device, dtype=torch.float32) -> torch.nn.Module:
    """A deep copy with its own weights (normal tensors even if the original's are inference
    tensors: call with inference mode off), in float32 for the optimisation."""
    return copy.deepcopy(module).to(device=device, dtype=dtype).train(False)


def masked_mse(a: torch.Tensor, b: torch.Tensor, region: torch.Tensor) -> float:
    """Mean squared error over the pixels where region == 1 (images and region broadcastable)."""
    region = region.expand_as(a)
    count = region.sum()
    if count == 0:
        return 0.0
    return float(((a - b) ** 2 * region).sum() / count)


# ---------------------------------------------------------------------------------------------
# Pixel-level blending

def feather(mask: torch.Tensor, radius: float) -> torch.Tensor:
    """A soft edge for a binary mask [B, H, W]: Gaussian blur with sigma = radius / 2 (pixels),
    so the transition spans about `radius` pixels on either side of the edge."""
    if radius <= 0:
        return mask
    from torchvision.transforms.functional import gaussian_blur

    sigma = radius / 2.0
    size = 2 * int(math.ceil(3 * sigma)) + 1
    return gaussian_blur(mask[:, None], [size, size], [sigma, sigma])[:, 0].clamp(0, 1)


def paste(edited: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pixel paste: the edited pixels inside the (possibly feathered) mask, the source outside.
    Images BHWC, mask [B, H, W]."""
    m = mask[..., None]
    return edited * m + source * (1 - m)


def poisson_blend(edited: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Poisson (seamless) blending, Perez et al. 2003, as OpenCV's NORMAL_CLONE: inside the mask,
    solve laplacian(f) = laplacian(edited) with f = source on the mask's outer boundary.

    One HWC image, one binary mask [H, W]. The sparse system (5-point Laplacian over the masked
    pixels; neighbours outside the image are left out, a Neumann edge) is solved by scipy's sparse
    LU, factorised once for the three channels. Unlike cv2.seamlessClone it needs no extra
    dependency, works in float, and accepts masks that touch the image border. A full mask has no
    boundary to blend with and returns the edited image; an empty one returns the source."""
    import numpy as np
    import scipy.sparse
    import scipy.sparse.linalg

    inside = mask.cpu().numpy() > 0.5
    if not inside.any():
        return source.clone()
    if inside.all():
        return edited.clone()
    g = edited.detach().cpu().double().numpy()
    s = source.detach().cpu().double().numpy()
    h, w = inside.shape
    index = -np.ones((h, w), dtype=np.int64)
    ys, xs = np.nonzero(inside)
    n = ys.size
    index[ys, xs] = np.arange(n)

    rows, cols, vals = [np.arange(n)], [np.arange(n)], []
    diagonal = np.zeros(n)
    rhs = np.zeros((n, g.shape[-1]))
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ny, nx = ys + dy, xs + dx
        in_image = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        p = np.nonzero(in_image)[0]
        qy, qx = ny[p], nx[p]
        diagonal[p] += 1
        rhs[p] += g[ys[p], xs[p]] - g[qy, qx]          # guidance field: the edit's gradients
        q_index = index[qy, qx]
        unknown = q_index >= 0
        rows.append(p[unknown])
        cols.append(q_index[unknown])
        vals.append(-np.ones(int(unknown.sum())))
        boundary = ~unknown
        rhs[p[boundary]] += s[qy[boundary], qx[boundary]]  # Dirichlet: the source on the boundary
    data = np.concatenate([diagonal] + vals)
    matrix = scipy.sparse.csc_matrix((data, (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    solve = scipy.sparse.linalg.factorized(matrix)
    out = s.copy()
    for c in range(g.shape[-1]):
        out[ys, xs, c] = solve(rhs[:, c])
    return torch.from_numpy(out).to(edited.dtype).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# Ranking (Sec. 4.4)

def masked_for_ranking(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The official code ranks `sample * mask`: the edit with everything outside the mask black."""
    return images * masks[..., None]


def rank_by_similarity(image_features: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity of each (normalised) image feature with the (normalised) prompt feature,
    and the order from most to least similar (the code sorts `1 - cos` ascending; ties keep batch order)."""
    similarity = (image_features.float() @ text_features.float().reshape(-1, 1)).reshape(-1)
    order = torch.sort(-similarity, stable=True).indices
    return similarity, order


def format_scores(similarity: torch.Tensor, order: Sequence[int]) -> str:
    """One line per kept image: its rank, its index in the input batch, its CLIP similarity."""
    return "\n".join(f"{rank + 1}. image {int(i)}: similarity {float(similarity[i]):.4f}" for rank, i in enumerate(order))
