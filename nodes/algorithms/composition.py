"""Turn-by-turn editing without drift (issue 10; the CDD-ICM paper's iterative setting, arXiv 2304.02192,
Sec. 3: each turn's output is the next turn's reference) in plain torch.

Nothing here knows about ComfyUI. The loop `iterate_edits` takes the source image, one instruction
per turn and an optional binary mask per turn, and calls `edit_turn(turn, reference, latent_mask)`,
which returns the decoded edit of `reference` (the previous turn's image). What this module adds
over naive chaining (encode, edit, decode, repeat) is the paste-back:

    image_k = where(mask_k, decoded_k, image_{k-1})

so a pixel no turn's mask covers is the source's own value after any number of turns (bit for
bit), and a region edited at turn k stays exactly as turn k left it until a later mask covers it.
Naive chaining passes every pixel through the VAE once per turn and the image drifts.

The latent mask given to the sampler covers every latent cell that holds an edited pixel (a max-pool
of the pixel mask), so each edited pixel is regenerated rather than half-kept.

Images are BHWC in [0, 1] (ComfyUI's IMAGE layout); masks [T, H, W].
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

DEFAULT_MAX_TURNS = 16


# ---------------------------------------------------------------------------------------------
# Inputs

def parse_instructions(text: str, max_turns: int) -> list[str]:
    """One instruction per line. Leading/trailing blank lines are dropped; a blank line between two
    instructions is an error (a turn the user probably meant to fill), as is no instruction or more
    than `max_turns`. Raises ValueError with a message for the user."""
    lines = [line.strip() for line in str(text).replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    if not lines:
        raise ValueError("is blank: write one instruction per line, one line per turn")
    blank = [i + 1 for i, line in enumerate(lines) if not line]
    if blank:
        raise ValueError(f"line {blank[0]} is blank between two instructions: every turn needs an instruction "
                         "(remove the blank line)")
    if len(lines) > max_turns:
        raise ValueError(f"has {len(lines)} instructions, more than the limit of {max_turns} turns "
                         "(raise max_turns or split the list)")
    return lines


def turn_masks(masks: torch.Tensor, turns: int, height: int, width: int, threshold: float) -> torch.Tensor:
    """Binary masks [turns, height, width] (bool) from a MASK batch of one per turn or one for all
    turns, of any size (resized bilinearly, then thresholded at `threshold`)."""
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise ValueError(f"expected a mask of shape [H, W] or [B, H, W], got {tuple(masks.shape)}")
    if masks.shape[0] not in (1, turns):
        raise ValueError(f"has {masks.shape[0]} masks for {turns} instructions: give one mask for all turns, "
                         "or one per instruction line")
    masks = masks.float()
    if masks.shape[-2:] != (height, width):
        masks = F.interpolate(masks[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    return (masks >= threshold).expand(turns, height, width).clone()


def latent_mask(pixel_mask: torch.Tensor, ratio: int) -> torch.Tensor:
    """The latent cells [B, H/ratio, W/ratio] (float 0/1) that hold any masked pixel of a bool mask
    [B, H, W] whose sides are multiples of `ratio`."""
    return F.max_pool2d(pixel_mask[:, None].float(), kernel_size=ratio, stride=ratio)[:, 0]


def crop_box(height: int, width: int, ratio: int) -> tuple[int, int, int, int]:
    """(top, left, h, w): the centred crop VAE encoders take of an image whose sides are not multiples
    of their downscale ratio (ComfyUI's `vae_encode_crop_pixels`)."""
    h, w = (height // ratio) * ratio, (width // ratio) * ratio
    return (height % ratio) // 2, (width % ratio) // 2, h, w


# ---------------------------------------------------------------------------------------------
# The loop

def paste_back(edited: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The edit inside the bool mask [B, H, W], the reference's own values outside (exactly, no
    arithmetic on them)."""
    return torch.where(mask[..., None], edited.to(reference.dtype), reference)


EditTurn = Callable[[int, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def iterate_edits(source: torch.Tensor, turns: int, edit_turn: EditTurn, masks: torch.Tensor | None = None,
                  on_turn: Callable[[int, torch.Tensor], None] | None = None) -> list[torch.Tensor]:
    """Run `turns` edits, each on the previous turn's image. `edit_turn(turn, reference, mask)`
    returns the decoded edit (same shape as reference). With masks (bool [turns, H, W]) every turn
    pastes the reference back outside its mask; without, the edit is the whole image (an
    image-to-image pass, which drifts like any chain). Returns the image after every turn."""
    if masks is not None and masks.shape[0] != turns:
        raise ValueError(f"{masks.shape[0]} masks for {turns} turns")
    reference = source[..., :3]
    images = []
    for turn in range(turns):
        mask = None if masks is None else masks[turn:turn + 1].to(reference.device)
        edited = edit_turn(turn, reference, mask)
        if edited.shape != reference.shape:
            raise ValueError(f"turn {turn + 1}: the edit has shape {tuple(edited.shape)}, the reference {tuple(reference.shape)}")
        reference = edited.to(reference.dtype) if mask is None else paste_back(edited, reference, mask)
        images.append(reference)
        if on_turn is not None:
            on_turn(turn, reference)
    return images


def naive_chain(source: torch.Tensor, turns: int, edit_turn: EditTurn, masks: torch.Tensor | None = None) -> list[torch.Tensor]:
    """What chaining edit nodes does today: each turn's decoded image, whole, is the next reference
    (the mask only steers the sampler). The baseline of the drift benchmark."""
    reference, images = source[..., :3], []
    for turn in range(turns):
        mask = None if masks is None else masks[turn:turn + 1].to(reference.device)
        reference = edit_turn(turn, reference, mask).to(reference.dtype)
        images.append(reference)
    return images


# ---------------------------------------------------------------------------------------------
# Drift measurement

def union_masks(masks: torch.Tensor) -> torch.Tensor:
    """Running union: row k is the union of the masks of turns 0..k (bool [T, H, W])."""
    return torch.cumsum(masks.long(), dim=0) > 0


def last_edited(masks: torch.Tensor) -> torch.Tensor:
    """For every turn k and pixel, the last turn <= k whose mask covered it, or -1 ([T, H, W] long)."""
    turns = masks.shape[0]
    index = torch.arange(turns, device=masks.device).view(turns, 1, 1).expand_as(masks)
    marked = torch.where(masks, index, torch.full_like(index, -1))
    return torch.cummax(marked, dim=0).values


def drift_curves(images: list[torch.Tensor], source: torch.Tensor, masks: torch.Tensor) -> dict[str, list[float]]:
    """Per turn k (images[k] is the image after turn k, masks bool [T, H, W]):
      * untouched: mean |image_k - source| (0-255 scale) over pixels no mask of turns 0..k covered;
      * kept_edits: mean |image_k - image_j| over pixels last edited at an earlier turn j < k (what a
        later turn should leave alone): the drift of the edited regions;
      * edited_psnr: PSNR (dB) of those kept edited pixels against their value right after turn j.
    Exact paste-back gives 0, 0 and inf; naive chaining grows with every turn."""
    source = source[..., :3]
    untouched, kept, psnr = [], [], []
    last = last_edited(masks)
    for k, image in enumerate(images):
        outside = ~union_masks(masks)[k]
        diff = (image[0] - source[0]).abs().mean(-1)
        untouched.append(float(diff[outside].mean() * 255) if outside.any() else 0.0)
        errors = []
        for j in range(k):
            region = (last[k] == j)
            if region.any():
                errors.append((image[0] - images[j][0])[region])
        if errors:
            err = torch.cat(errors)
            kept.append(float(err.abs().mean() * 255))
            mse = float((err ** 2).mean())
            psnr.append(float("inf") if mse == 0 else float(10 * torch.log10(torch.tensor(1.0 / mse))))
        else:
            kept.append(0.0)
            psnr.append(float("inf"))
    return {"untouched": untouched, "kept_edits": kept, "edited_psnr": psnr}
