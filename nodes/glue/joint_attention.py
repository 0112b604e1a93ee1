"""ComfyUI glue for joint (text + image) attention: SD3/SD3.5's MMDiT and Flux-family DiTs.

The same shared hook as for UNets (glue.attention), at different patch points: a
`patches_replace["dit"]` replacement on every double-stream block (and, if asked, every Flux
single-stream block) wraps whatever replacement another pack installed there. Unless the step's
transformer_options carry the segmentation-free or segmentation-map key it only calls through,
so before the switch the model runs exactly as without it. After the switch it passes the block
a copy of transformer_options with an `optimized_attention_override` (ComfyUI's own attention
override point, wrapping any override already there) that knows where the text and image tokens
of this block's joint sequence are; the override runs the model's own attention and adds the
segmentation-free correction to the rows of the chunk marked uncond (the ε̄ pass), or records
the image-to-text weights of the cond chunk for the segmentation map. The attention arithmetic
is nodes/algorithms/segfree.py's."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..algorithms import segfree as segfree_algo
from . import NodeInputError, diffusion_model, model_family
from .attention import SEGFREE_KEY, SEGMAP_KEY, SegfreeStep, SegmapRecorder

JOINT_CALL_KEY = "mc_joint_call"         # JointCall: where text and image tokens are in this block
TEXT_TOKENS_KEY = "mc_joint_text_tokens"  # text tokens of this forward pass (for Flux single blocks)

# Families ComfyUI 0.3.75 loads whose text conditioning is attended by image tokens (cross- or
# joint attention) and that the edit is not wired for: refused by name.
UNSUPPORTED_FAMILIES = {
    "AuraFlow": "AuraFlow's MMDiT keeps its text tokens in registers and blocks of its own",
    "PixArtAlpha": "PixArt uses its own cross-attention blocks", "PixArtSigma": "PixArt uses its own cross-attention blocks",
    "HunyuanDiT": "HunyuanDiT uses its own cross-attention blocks", "HunyuanDiT1": "HunyuanDiT uses its own cross-attention blocks",
    "Lumina2": "Lumina 2 refines text and image tokens in separate blocks first",
    "ZImage": "Z-Image (Lumina 2 architecture) refines text and image tokens in separate blocks first",
    "HiDream": "HiDream feeds its text in per-block LLM layers", "QwenImage": "Qwen-Image runs its own joint-attention code",
    "Omnigen2": "Omnigen2 runs its own attention code", "HunyuanImage21": "HunyuanImage uses its own attention code",
    "HunyuanImage21Refiner": "HunyuanImage uses its own attention code", "CosmosT2IPredict2": "Cosmos uses its own attention code",
    "Flux2": "Flux 2 is not tested here yet", "Chroma": "Chroma (Flux layers, own masking) is not tested here yet",
    "ChromaRadiance": "Chroma Radiance (pixel space) is not tested here yet",
    "Stable_Cascade_C": "Stable Cascade uses its own attention blocks", "Stable_Cascade_B": "Stable Cascade uses its own attention blocks",
}
JOINT_FAMILIES = ("SD3", "Flux", "FluxSchnell", "FluxInpaint")


@dataclass(frozen=True)
class JointAttentionSite:
    """One joint-attention block, keyed as ComfyUI's patches_replace["dit"] keys it."""
    kind: str   # "double_block" | "single_block"
    index: int
    text_first: bool = True

    @property
    def key(self) -> tuple:
        return (self.kind, self.index)


@dataclass(frozen=True)
class JointCall:
    text: slice
    image: slice
    total: int
    grid: tuple | None  # image tokens' patch grid (rows, columns), for the segmentation map


def joint_attention_sites(model_patcher, single_blocks: bool = False) -> list[JointAttentionSite]:
    """Double-stream blocks of SD3/SD3.5 (`joint_blocks`) and Flux-family models
    (`double_blocks`), plus Flux's single-stream blocks when asked. [] for other networks."""
    net = diffusion_model(model_patcher)
    if model_family(model_patcher) not in JOINT_FAMILIES:
        return []
    if hasattr(net, "joint_blocks"):
        return [JointAttentionSite("double_block", i) for i in range(len(net.joint_blocks))]
    sites = [JointAttentionSite("double_block", i, not getattr(block, "flipped_img_txt", False))
             for i, block in enumerate(getattr(net, "double_blocks", []))]
    if single_blocks:
        sites += [JointAttentionSite("single_block", i) for i in range(len(getattr(net, "single_blocks", [])))]
    return sites


def refuse_family(model_patcher, node: str):
    family = model_family(model_patcher)
    if family in UNSUPPORTED_FAMILIES:
        raise NodeInputError(node, "model", f"{family} models are not supported: {UNSUPPORTED_FAMILIES[family]}, which this "
                             "node does not edit. Supported: SD1.x, SD2.x, SDXL-style UNets, SD3/SD3.5 and Flux-family models")
    if hasattr(diffusion_model(model_patcher), "input_blocks"):  # a UNet whose cross-attention is gone
        raise NodeInputError(node, "model", f"this {family} model has no cross-attention layers to read words from")
    raise NodeInputError(node, "model", f"{family} models are not supported by this node (video, audio and 3D families are "
                         "not edited). Supported: SD1.x, SD2.x, SDXL-style UNets, SD3/SD3.5 and Flux-family models")


def existing_dit_replacement(model_patcher, site: JointAttentionSite):
    return model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {}).get(site.key)


def _patch_grid(options) -> tuple | None:
    shape = options.get(GRID_KEY)
    return tuple(shape) if shape is not None else None


GRID_KEY = "mc_joint_patch_grid"  # set by record_segmentation: (rows, columns) of image patches


def make_dit_replacement(site: JointAttentionSite, previous=None):
    """The block replacement: plain call-through unless this step edits or records."""
    def call_inner(args, extra):
        return previous(args, extra) if previous is not None else extra["original_block"](args)

    def block(args, extra):
        options = args.get("transformer_options") or {}
        if options.get(SEGFREE_KEY) is None and options.get(SEGMAP_KEY) is None:
            return call_inner(args, extra)
        if site.kind == "double_block":
            text_tokens, image_tokens = args["txt"].shape[1], args["img"].shape[1]
            options[TEXT_TOKENS_KEY] = text_tokens  # the same dict reaches the single blocks of this pass
        else:
            text_tokens = options.get(TEXT_TOKENS_KEY)
            if text_tokens is None:
                return call_inner(args, extra)
            image_tokens = args["img"].shape[1] - text_tokens
        total = text_tokens + image_tokens
        if site.text_first:
            text, image = slice(0, text_tokens), slice(text_tokens, total)
        else:
            image, text = slice(0, image_tokens), slice(image_tokens, total)
        call = JointCall(text, image, total, _patch_grid(options))
        inner_options = {**options, JOINT_CALL_KEY: call,
                         "optimized_attention_override": make_attention_override(options.get("optimized_attention_override"))}
        return call_inner({**args, "transformer_options": inner_options}, extra)

    return block


def _heads_layout(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """(B, L, H·D) or (B, L, H, D) or already (B, H, L, D) -> (B, H, L, D)."""
    if skip_reshape:
        return t
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def make_attention_override(previous=None):
    """ComfyUI's optimized_attention_override: (func, *args, **kwargs) -> output."""
    def override(func, *args, **kwargs):
        def base(*a, **kw):
            return previous(func, *a, **kw) if previous is not None else func(*a, **kw)

        out = base(*args, **kwargs)
        options = kwargs.get("transformer_options") or {}
        call: JointCall | None = options.get(JOINT_CALL_KEY)
        q, k, v = args[:3]
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        skip_reshape = kwargs.get("skip_reshape", False)
        length = k.shape[2] if skip_reshape else k.shape[1]
        if call is None or length != call.total or kwargs.get("skip_output_reshape", False):
            return out  # not this block's joint attention (SD3.5's extra image self-attention)
        step: SegfreeStep | None = options.get(SEGFREE_KEY)
        recorder: SegmapRecorder | None = options.get(SEGMAP_KEY)
        kinds = options.get("cond_or_uncond", [])
        special = [i for i, kind in enumerate(kinds) if (step is not None and kind == 1) or (recorder is not None and kind == 0)]
        if not special:
            return out
        mask = kwargs.get("mask")
        rows = q.shape[0] // len(kinds)
        uuids = options.get("uuids", [None] * len(kinds))

        def share_attention(qh, kh, indicator, part):
            """softmax(q kᵀ/√d) · indicator with the block's mask, in torch's SDPA: the indicator is one
            channel wide, which ComfyUI's attention functions (values as wide as the keys) do not take."""
            m = mask[part] if mask is not None and mask.shape[0] == q.shape[0] else mask
            if m is not None:
                m = m[None] if m.ndim == 2 else m
                m = m[:, None] if m.ndim == 3 else m
                m = m.to(qh.dtype) if m.dtype != torch.bool else m
            return torch.nn.functional.scaled_dot_product_attention(qh, kh, indicator.to(qh.dtype), attn_mask=m)

        for i in special:
            part = slice(i * rows, (i + 1) * rows)
            qh, kh, vh = (_heads_layout(t[part], heads, skip_reshape) for t in (q, k, v))
            attention = lambda a, b, c, part=part: share_attention(a, b, c, part)  # noqa: E731
            text_len = call.text.stop - call.text.start
            if step is not None and kinds[i] == 1:
                token_map = step.token_maps.get(uuids[i])
                if token_map is None or text_len % token_map.candidates.shape[0]:
                    token_map = segfree_algo.default_token_map(text_len, None)
                token_map = token_map.fit(text_len, qh.device)
                correction = segfree_algo.joint_segfree_correction(qh, kh, vh, call.text, call.image, step.segfree_scale,
                                                                   token_map, step.per_head, attention)
                correction = correction.transpose(1, 2).reshape(rows, correction.shape[2], -1).to(out.dtype)
                out[part, call.image] += correction
            else:
                weights = segfree_algo.image_to_text_weights(qh, kh, call.text, call.image, attention)
                if call.grid is not None:
                    weights = weights[:, :, :call.grid[0] * call.grid[1]]  # reference latents (Kontext) are not mapped
                recorder.add(weights, None, grid=call.grid)
        return out

    return override


def install_joint_attention_hook(model_patcher, node: str, single_blocks: bool = False):
    """Clone the MODEL and put the shared dit replacement on every joint-attention block,
    wrapping any replacement already there; refuses other families by name."""
    sites = joint_attention_sites(model_patcher, single_blocks)
    if not sites:
        refuse_family(model_patcher, node)
    patched = model_patcher.clone()
    for site in sites:
        patched.set_model_patch_replace(make_dit_replacement(site, existing_dit_replacement(model_patcher, site)), "dit", *site.key)
    return patched


def dit_patch_grid(model_patcher, latent_hw) -> tuple:
    """Rows and columns of image patches a DiT makes of a latent (ComfyUI pads to the patch size)."""
    net = diffusion_model(model_patcher)
    patch = getattr(net, "patch_size", 2)
    return (-(-latent_hw[0] // patch), -(-latent_hw[1] // patch))
