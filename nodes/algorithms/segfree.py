"""Segmentation-free guidance (Azarian, Das, Hou, Porikli, CVPR 2024 workshop, arXiv 2407.04800).

Plain torch; nothing here knows ComfyUI. Equation numbers are the paper's (see
../shared/ALGORITHMS.md section 1, which recovers the formulas stripped from our copy).

* Eq. 9, the local semantic of patch p in a cross-attention module:
      s(p) = argmax_{i != BOS} A[p, i]
* The modified pass ε̄(z, c): in every cross-attention module the post-softmax weight of s(p)
  is multiplied by -a (a = `segfree_scale`), the other weights are left as they are and are
  not renormalised:  A'[p, s(p)] = -a · A[p, s(p)],  out_p = Σ_j A'[p, j] V_j.
* Eq. 11, the guided score:  ε̂ = ε(z, c) + w̄ (ε(z, c) − ε̄(z, c))   (`segfree_cfg` = w̄).

Choices the paper leaves open, made here and exposed to the user:
* the argmax over the head-averaged weights (one word per patch, every head edited) or per head;
* tokens of one word (a word the tokenizer splits, "maltese" -> "mal", "tese") are edited
  together when a word map is known: the argmax picks a token, its whole word is scaled;
* end-of-text and padding tokens are candidates only when asked (SD1.x pads with repeated
  end tokens, which often win the argmax while carrying no single word's meaning).

Joint attention (SD3's MMDiT, Flux's double-stream blocks): image and text tokens form one
sequence and every query attends to every key. The paper's cross-attention weights are the
image-query-to-text-key block of that softmax (the softmax runs over text and image keys
together, as the model computes it). Only that block is edited, A'[p, s(p)] = -a · A[p, s(p)]
for image queries p; text queries and image-to-image weights are untouched, nothing is
renormalised. The edited output is the plain fused attention plus a correction,
      out'_p = out_p + (-a - 1) Σ_{j ∈ s(p) and its word} A[p, j] V_j,
which needs the image-to-text block only (N_img × T), never the N × N matrix
(`image_to_text_weights`).
T5 has no BOS token; nothing is excluded by position there. With the default candidates the
end token and the padding are excluded (as SD1's end/padding), so s(p) is a prompt word.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class TokenMap:
    """What the attention edit needs to know about the prompt's key positions.

    candidates: (L,) bool, positions that may be a patch's most-attended token (BOS never).
    words:      (L,) long, a word index per position (0 for specials); positions sharing a
                positive index are scaled together.
    """
    candidates: torch.Tensor
    words: torch.Tensor
    # candidates when end/padding tokens may win too (every position but a BOS); None: all but
    # the BOS of each 77-token chunk (the CLIP layout)
    with_specials: torch.Tensor | None = None
    # candidates that are content words (not "a", "the", "of", "to"...); None: not known
    content: torch.Tensor | None = None

    def fit(self, length: int, device) -> "TokenMap":
        """Match a context length: ComfyUI repeats a shorter context when it batches prompts of
        different lengths together, so the map is repeated the same way."""
        n = self.candidates.shape[0]
        reps = 1
        if n != length:
            if length % n:
                raise ValueError(f"token map of length {n} does not fit a context of length {length}")
            reps = length // n
        if reps == 1 and self.candidates.device == torch.device(device):
            return self  # the usual case, met in every attention call: nothing to copy
        specials = None if self.with_specials is None else self.with_specials.repeat(reps).to(device)
        content = None if self.content is None else self.content.repeat(reps).to(device)
        return TokenMap(self.candidates.repeat(reps).to(device), self.words.repeat(reps).to(device), specials, content)

    def including_specials(self) -> "TokenMap":
        """The same words, with end and padding tokens as candidates too (never a BOS)."""
        specials = self.with_specials if self.with_specials is not None else default_token_map(self.candidates.shape[0]).candidates
        return TokenMap(specials.to(self.candidates.device), self.words, specials, self.content)

    def content_words_only(self) -> "TokenMap":
        """Only content words may win s(p): a function word ("a", "of") says nothing about what a
        patch shows, yet often takes the most attention. A prompt of function words only, or a map
        that does not know its words, keeps its candidates."""
        if self.content is None or not bool(self.content.any()):
            return self
        return TokenMap(self.content.to(self.candidates.device), self.words, self.with_specials, self.content)


def default_token_map(length: int, chunk: int | None = 77) -> TokenMap:
    """Without the prompt's tokens: every position but the BOS of each 77-token chunk (CLIP
    contexts), or every position (chunk None: T5-style contexts, which have no BOS)."""
    candidates = torch.ones(length, dtype=torch.bool)
    if chunk:
        candidates[::chunk] = False
    return TokenMap(candidates, torch.zeros(length, dtype=torch.long), candidates.clone())


def attention_weights(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q kᵀ / √d) per head, in float32. q: (B, N, H·D), k: (B, L, H·D) -> (B, H, N, L)."""
    b, n, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, n, heads, d).transpose(1, 2).float()
    kh = k.reshape(b, -1, heads, d).transpose(1, 2).float()
    return torch.softmax(qh @ kh.transpose(-1, -2) * (1.0 / math.sqrt(d)), dim=-1)


def apply_weights(weights: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Σ_j A[p, j] V_j per head. weights: (B, H, N, L), v: (B, L, H·D) -> (B, N, H·D) in v's dtype."""
    b, l, inner = v.shape
    vh = v.reshape(b, l, heads, inner // heads).transpose(1, 2).float()
    out = weights @ vh
    return out.transpose(1, 2).reshape(b, -1, inner).to(v.dtype)


def most_attended(weights: torch.Tensor, token_map: TokenMap, per_head: bool) -> torch.Tensor:
    """Eq. 9: s(p) among the candidate tokens. weights (B, H, N, L) -> (B, H or 1, N) indices."""
    scores = weights if per_head else weights.mean(dim=1, keepdim=True)
    scores = scores.masked_fill(~token_map.candidates.view(1, 1, 1, -1), float("-inf"))
    return scores.argmax(dim=-1)


def selected_positions(index: torch.Tensor, token_map: TokenMap) -> torch.Tensor:
    """(B, H', N) argmax indices -> (B, H', N, L) bool: the argmax token and the rest of its word."""
    length = token_map.words.shape[0]
    chosen = torch.nn.functional.one_hot(index, length).bool()
    word = token_map.words[index]  # (B, H', N)
    same_word = (token_map.words.view(1, 1, 1, -1) == word.unsqueeze(-1)) & (word.unsqueeze(-1) > 0)
    return chosen | same_word


def segfree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, segfree_scale: float,
                      token_map: TokenMap, per_head: bool = False) -> torch.Tensor:
    """The modified cross-attention of the ε̄ pass: weight of s(p) (and its word) times -a."""
    weights = attention_weights(q, k, heads)
    selected = selected_positions(most_attended(weights, token_map, per_head), token_map)
    factor = torch.where(selected, torch.tensor(-float(segfree_scale), device=weights.device),
                         torch.tensor(1.0, device=weights.device))
    return apply_weights(weights * factor, v, heads)


def segfree_combine(cond: torch.Tensor, modified: torch.Tensor, segfree_cfg: float) -> torch.Tensor:
    """Eq. 11: ε + w̄ (ε − ε̄). Linear, so it holds for noise and for denoised predictions alike."""
    return cond + segfree_cfg * (cond - modified)


# ---------------------------------------------------------------------------------------------
# Joint attention (MMDiT / Flux double-stream): tensors are (B, H, L, D), one sequence holding
# the text tokens (positions `text`) and the image tokens (positions `image`).

def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The fused attention softmax(q kᵀ/√d) v, (B, H, L, D) -> (B, H, L, D)."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def image_to_text_weights(q: torch.Tensor, k: torch.Tensor, text: slice, image: slice, attention=sdpa) -> torch.Tensor:
    """A[p, j] for image queries p and text keys j, where the softmax runs over every key (text
    and image), as in the model: (B, H, N_img, T) in float32.

    Without the N × N matrix: the text logits are explicit (N_img × T), and their share of each
    row's softmax mass, Σ_{j ∈ text} A[p, j], is one fused attention call whose values are the
    text-key indicator, one channel wide (the attention's value product then costs 1/D of the
    model's; `attention` must take values narrower than the keys, as torch's SDPA does).
    A[p, j] = share_p · softmax over the text logits alone."""
    q_img = q[:, :, image]
    logits = (q_img.float() @ k[:, :, text].float().transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    indicator = k.new_zeros(k.shape[:-1] + (1,))
    indicator[:, :, text] = 1.0
    share = attention(q_img, k, indicator)[..., 0].float()
    return torch.softmax(logits, dim=-1) * share.unsqueeze(-1)


def joint_segfree_correction(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text: slice, image: slice,
                             segfree_scale: float, token_map: TokenMap, per_head: bool = False,
                             attention=sdpa) -> torch.Tensor:
    """What the ε̄ pass adds to the plain joint attention output of the image queries:
    (-a - 1) Σ_{j selected} A[p, j] V_j, with s(p) (eq. 9) and its word selected among the text
    keys. (B, H, N_img, D) in float32; text queries get no correction."""
    weights = image_to_text_weights(q, k, text, image, attention)
    selected = selected_positions(most_attended(weights, token_map, per_head), token_map)
    edit = weights * selected * (-float(segfree_scale) - 1.0)
    return edit @ v[:, :, text].float()


def joint_segfree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text: slice, image: slice,
                            segfree_scale: float, token_map: TokenMap, per_head: bool = False,
                            attention=sdpa) -> torch.Tensor:
    """The modified joint attention of the ε̄ pass, (B, H, L, D) in v's dtype."""
    out = attention(q, k, v).clone()
    correction = joint_segfree_correction(q, k, v, text, image, segfree_scale, token_map, per_head, attention)
    out[:, :, image] += correction.to(out.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# The implied segmentation (what MC_SegmentationMap shows)

def accumulate_word_scores(weights: torch.Tensor, token_map: TokenMap, latent_hw: tuple[int, int],
                           grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Head-averaged attention summed per word, upsampled to the latent grid.

    weights (B, H, N, L) of one module whose N patches tile the latent at a lower resolution
    (`grid` rows x columns when known, as for DiT patches; else guessed from N).
    Returns (B, W, h, w) where W = number of words + 1; index 0 gathers the candidate tokens
    that belong to no word (end/padding), so the per-word channels start at 1."""
    b, _, n, _ = weights.shape
    lat_h, lat_w = latent_hw
    if grid is None:
        factor = math.sqrt(lat_h * lat_w / n)
        grid_h, grid_w = max(1, round(lat_h / factor)), max(1, round(lat_w / factor))
    else:
        grid_h, grid_w = grid
    mean = weights.mean(dim=1)  # (B, N, L)
    words = token_map.words.clone()
    words[~token_map.candidates] = -1
    n_words = int(words.max().item()) + 1 if words.numel() else 1
    per_word = torch.zeros(b, n, max(n_words, 1), device=weights.device)
    keep = words >= 0
    per_word.index_add_(2, words[keep], mean[..., keep])
    per_word = per_word.transpose(1, 2).reshape(b, -1, grid_h, grid_w)
    return torch.nn.functional.interpolate(per_word, size=(lat_h, lat_w), mode="bilinear", align_corners=False)


def segmentation_from_scores(word_scores: torch.Tensor) -> torch.Tensor:
    """(B, W, h, w) per-word attention sums -> (B, h, w) word index of the most-attended word
    (eq. 9 aggregated over modules and steps); channel 0 (no word) never wins unless it is
    the only one."""
    scores = word_scores.clone()
    if scores.shape[1] > 1:
        scores[:, 0] = float("-inf")
    return scores.argmax(dim=1)


PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180)]


def render_segmentation(labels: torch.Tensor, words: list[str], size: tuple[int, int], min_width: int = 384):
    """Colour each pixel by its word and draw a legend strip under the map.

    labels (h, w) word indices (1-based; 0 = end/padding); size (H, W) pixels of the image the
    latent decodes to. Small images are enlarged (nearest) to `min_width` so the legend is
    readable. Returns a float tensor (rows, columns, 3) in [0, 1]."""
    import numpy
    from PIL import Image, ImageDraw

    scale = max(1, -(-min_width // size[1]))
    height, width = size[0] * scale, size[1] * scale
    up = torch.nn.functional.interpolate(labels[None, None].float(), size=(height, width), mode="nearest")[0, 0].long()
    colours = torch.tensor([(90, 90, 90)] + PALETTE * (1 + len(words) // len(PALETTE)), dtype=torch.uint8)
    picture = colours[up.clamp(max=colours.shape[0] - 1)]
    columns = max(1, width // 128)
    entries = ["(end/pad)"] + list(words)
    canvas = Image.new("RGB", (width, height + 16 * (-(-len(entries) // columns)) + 6), (255, 255, 255))
    canvas.paste(Image.fromarray(picture.numpy()), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, word in enumerate(entries):
        x, y = (i % columns) * (width // columns) + 4, height + 4 + (i // columns) * 16
        draw.rectangle([x, y + 2, x + 10, y + 12], fill=tuple(int(c) for c in colours[i]))
        draw.text((x + 15, y + 1), f"{i}: {word}" if i else word, fill=(0, 0, 0))
    return torch.from_numpy(numpy.array(canvas)).float() / 255.0
