"""ComfyUI glue for cross-attention: where the attn2 modules are, which prompt tokens are words,
the one attn2 replacement shared by segmentation-free guidance and the segmentation map, and
segmentation-free guidance as a MODEL patch and as a GUIDER."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..algorithms import segfree as segfree_algo
from . import CrossAttentionSite, NodeInputError, cross_attention_sites, existing_attn2_replacement, model_family

# ---------------------------------------------------------------------------------------------
# Prompt token maps: which context positions are words (CLIPTextEncode drops that knowledge)

TOKEN_MAP_KEY = "mc_token_map"


def token_map_from_tokens(tokenizer, tokens: dict) -> segfree_algo.TokenMap:
    """Build the TokenMap of a tokenized prompt (ComfyUI's `clip.tokenize` output: per encoder
    key, a list of 77-token chunks of (token, weight) pairs). Words are recovered from the
    BPE vocabulary, whose word-final pieces end in '</w>'; embeddings (textual inversion) are
    words of their own. Several chunks (prompts over 75 tokens) are concatenated as ComfyUI
    concatenates their contexts."""
    key = next((k for k in ("l", "g", "h") if k in tokens), next(iter(tokens)))
    sub = getattr(tokenizer, getattr(tokenizer, "clip", f"clip_{key}"), None) or getattr(tokenizer, f"clip_{key}", None)
    specials = {getattr(sub, name, None) for name in ("start_token", "end_token", "pad_token")} - {None}
    inv_vocab = getattr(sub, "inv_vocab", {})
    candidates, words, word = [], [], 0
    open_word = False
    for chunk in tokens[key]:
        for pair in chunk:
            token = pair[0]
            if isinstance(token, int) and token in specials:
                candidates.append(False)
                words.append(0)
                open_word = False
                continue
            if not open_word:
                word += 1
            candidates.append(True)
            words.append(word)
            piece = inv_vocab.get(token, "</w>") if isinstance(token, int) else "</w>"
            open_word = not piece.endswith("</w>")
    return segfree_algo.TokenMap(torch.tensor(candidates, dtype=torch.bool), torch.tensor(words, dtype=torch.long))


class _TokenMapCLIPMixin:
    """A CLIP whose conditioning carries the prompt's TokenMap (key `mc_token_map`), so that
    attention edits know which positions are words. Clones stay of this kind, so a LoRA loader
    placed after it keeps the behaviour."""

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict={}, show_pbar=True):
        add = dict(add_dict)
        try:
            add[TOKEN_MAP_KEY] = token_map_from_tokens(self.tokenizer, tokens)
        except Exception:  # an exotic tokenizer: the attention edit falls back to its default map
            logging.warning("[More Control] could not read the prompt's tokens; all tokens but BOS are candidates")
        return super().encode_from_tokens_scheduled(tokens, unprojected=unprojected, add_dict=add, show_pbar=show_pbar)

    def clone(self):
        n = super().clone()
        n.__class__ = self.__class__
        return n


_token_map_classes: dict[type, type] = {}


def clip_with_token_maps(clip):
    """A clone of the user's CLIP (never the original) that tags its conditioning with TokenMaps."""
    if isinstance(clip, _TokenMapCLIPMixin):
        return clip.clone()
    cls = type(clip)
    if cls not in _token_map_classes:
        _token_map_classes[cls] = type(f"TokenMap{cls.__name__}", (_TokenMapCLIPMixin, cls), {})
    n = clip.clone()
    n.__class__ = _token_map_classes[cls]
    return n


def conditioning_token_map(cond_dict: dict, length: int) -> segfree_algo.TokenMap:
    token_map = cond_dict.get(TOKEN_MAP_KEY)
    if token_map is None or length % token_map.candidates.shape[0]:
        return segfree_algo.default_token_map(length)
    return token_map


# ---------------------------------------------------------------------------------------------
# The attn2 replacement shared by segmentation-free guidance and the segmentation map.
# It is installed on a clone at every cross-attention site, wraps whatever replacement
# another node installed there before, and does nothing of its own unless the step's
# transformer_options carry one of the keys below: before the switch it is plain attention.

SEGFREE_KEY = "mc_segfree"  # SegfreeStep: edit the chunks marked uncond (1) this step
SEGMAP_KEY = "mc_segmap"    # SegmapRecorder: record the cond chunks' attention per word


@dataclass
class SegfreeStep:
    segfree_scale: float
    per_head: bool
    token_maps: dict  # cond uuid -> TokenMap (candidates already chosen, on the sampling device)


class SegmapRecorder:
    """Sums the head-averaged attention per word over modules and calls, on the latent grid."""

    def __init__(self, token_map: segfree_algo.TokenMap):
        self.token_map = token_map
        self.total = None

    def add(self, weights: torch.Tensor, latent_hw):
        token_map = self.token_map.fit(weights.shape[-1], weights.device)
        scores = segfree_algo.accumulate_word_scores(weights, token_map, latent_hw).cpu()
        self.total = scores if self.total is None else self.total + scores


def _plain_attention(q, k, v, extra_options):
    """What CrossAttention.forward would have run (the same function, so results are bit-equal)."""
    from comfy.ldm.modules.attention import optimized_attention

    return optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                               transformer_options=extra_options)


def _chunk_options(extra_options, chunks: list[int]):
    sliced = dict(extra_options)
    for key in ("cond_or_uncond", "uuids"):
        if key in extra_options:
            sliced[key] = [extra_options[key][i] for i in chunks]
    return sliced


def _rows(t: torch.Tensor, chunks: list[int], rows: int) -> torch.Tensor:
    """The rows of some batch chunks; a view when they are contiguous (the usual [cond, uncond])."""
    if chunks == list(range(chunks[0], chunks[-1] + 1)):
        return t[chunks[0] * rows:(chunks[-1] + 1) * rows]
    return torch.cat([t[i * rows:(i + 1) * rows] for i in chunks])


def make_attn2_replacement(previous=None):
    """The attn2 replacement: plain (or the previous replacement's) attention for ordinary chunks,
    the segmentation-free edit for the chunk marked uncond after the switch, and a recording
    pass for the segmentation map. Per call it only looks at two dict keys unless one is set."""
    base = previous or _plain_attention

    def attn2(q, k, v, extra_options):
        step: SegfreeStep | None = extra_options.get(SEGFREE_KEY)
        recorder: SegmapRecorder | None = extra_options.get(SEGMAP_KEY)
        if step is None and recorder is None:
            return base(q, k, v, extra_options)
        kinds = extra_options.get("cond_or_uncond", [])
        special = [i for i, kind in enumerate(kinds) if (step is not None and kind == 1) or (recorder is not None and kind == 0)]
        if not special:
            return base(q, k, v, extra_options)
        heads = extra_options["n_heads"]
        rows = q.shape[0] // len(kinds)
        uuids = extra_options.get("uuids", [None] * len(kinds))
        outs = [None] * len(kinds)
        rest = [i for i in range(len(kinds)) if i not in special]
        if rest:
            out_rest = base(_rows(q, rest, rows), _rows(k, rest, rows), _rows(v, rest, rows), _chunk_options(extra_options, rest))
            for i, o in zip(rest, out_rest.split(rows)):
                outs[i] = o
        for i in special:
            part = slice(i * rows, (i + 1) * rows)
            qi, ki, vi = q[part], k[part], v[part]
            if step is not None and kinds[i] == 1:
                token_map = step.token_maps.get(uuids[i]) or segfree_algo.default_token_map(ki.shape[1])
                token_map = token_map.fit(ki.shape[1], ki.device)
                outs[i] = segfree_algo.segfree_attention(qi, ki, vi, heads, step.segfree_scale, token_map, step.per_head)
            else:
                weights = segfree_algo.attention_weights(qi, ki, heads)
                shape = extra_options.get("original_shape") or extra_options.get("activations_shape")
                recorder.add(weights, (shape[-2], shape[-1]))
                outs[i] = segfree_algo.apply_weights(weights, vi, heads)
        return torch.cat(outs)

    return attn2


def install_attention_hook(model_patcher, node: str):
    """Clone the MODEL and put the shared attn2 replacement at every cross-attention site,
    wrapping any replacement already there. Raises a NodeInputError for models without UNet
    cross-attention."""
    sites = cross_attention_sites(model_patcher)
    if not sites:
        family = model_family(model_patcher)
        if family in ("SD3", "Flux", "FluxSchnell", "AuraFlow", "HunyuanDiT", "PixArtAlpha", "PixArtSigma", "Lumina2", "HiDream", "Chroma", "QwenImage"):
            raise NodeInputError(node, "model", f"{family} models use joint text-image attention, not the separate "
                                 "cross-attention this node edits; only SD1.x, SD2.x and SDXL-style UNets are supported for now")
        raise NodeInputError(node, "model", f"this {family} model has no cross-attention layers to read words from")
    patched = model_patcher.clone()
    for site in sites:
        patched.set_model_attn2_replace(make_attn2_replacement(existing_attn2_replacement(model_patcher, site)), *site.key)
    return patched


def with_transformer_options(model_options: dict, **entries) -> dict:
    """A shallow copy of model_options whose transformer_options has extra entries."""
    options = dict(model_options)
    options["transformer_options"] = {**model_options.get("transformer_options", {}), **entries}
    return options


# ---------------------------------------------------------------------------------------------
# Segmentation-free guidance on a MODEL (any KSampler) and as a GUIDER

@dataclass(frozen=True)
class SegfreeSettings:
    segfree_scale: float = 10.0
    segfree_cfg: float = 2.0
    start_percent: float = 0.4
    per_head: bool = False
    include_specials: bool = False


def apply_segfree_guidance(model_patcher, settings: SegfreeSettings, node: str):
    """Clone the MODEL and make every sampler run segmentation-free guidance from
    `start_percent` on. Before that the sampler's own CFG (the user's cfg and negative) runs
    untouched. After it, the negative is replaced by the positive prompt run with the attention
    edit (marked as the uncond chunk, so the cross-attention hook knows which rows to edit),
    and a post-CFG hook turns ComfyUI's combine into eq. 11."""
    import comfy.samplers

    patched = install_attention_hook(model_patcher, node)
    previous_calc = model_patcher.model_options.get("sampler_calc_cond_batch_function")
    run_batch = previous_calc or (lambda args: comfy.samplers.calc_cond_batch(
        args["model"], args["conds"], args["input"], args["sigma"], args["model_options"]))
    maps_cache: dict = {}

    switch_sigmas: dict = {}  # model_sampling -> sigma of start_percent, computed once, not twice per step

    def after_switch(sigma, model) -> bool:
        sampling = model.model_sampling
        if sampling not in switch_sigmas:
            switch_sigmas.clear()
            switch_sigmas[sampling] = sampling.percent_to_sigma(settings.start_percent)
        return float(sigma.max()) <= switch_sigmas[sampling]

    def token_maps(positive, device) -> dict:
        maps = {}
        if len(maps_cache) > 64:  # uuids are new every run: forget earlier runs
            maps_cache.clear()
        for cond in positive:
            key = (cond["uuid"], device)
            if key not in maps_cache:
                length = cond["cross_attn"].shape[1] if "cross_attn" in cond else 77
                token_map = conditioning_token_map(cond, length)
                if settings.include_specials:
                    token_map = segfree_algo.TokenMap(segfree_algo.default_token_map(token_map.candidates.shape[0]).candidates,
                                                      token_map.words)
                if not bool(token_map.candidates.any()):
                    raise NodeInputError(node, "positive", "the prompt has no words for segmentation-free guidance to "
                                         "work on after the switch (it is empty); write a prompt or set start_percent to 1.0")
                maps_cache[key] = token_map.fit(token_map.candidates.shape[0], device)
            maps[cond["uuid"]] = maps_cache[key]
        return maps

    def calc_cond_batch(args):
        if not after_switch(args["sigma"], args["model"]):
            return run_batch(args)
        positive = args["conds"][0]
        step = SegfreeStep(settings.segfree_scale, settings.per_head, token_maps(positive, args["input"].device))
        return run_batch({**args, "conds": [positive, positive],
                          "model_options": with_transformer_options(args["model_options"], **{SEGFREE_KEY: step})})

    def post_cfg(args):
        denoised = args["denoised"]
        if not after_switch(args["sigma"], args["model"]):
            return denoised
        # ComfyUI combined uncond + s(cond - uncond) with the user's s; the difference to eq. 11 is
        # (1 + w̄ - s)(cond - ε̄). Adding it keeps whatever earlier post-CFG hooks added.
        return denoised + (1.0 + settings.segfree_cfg - args["cond_scale"]) * (args["cond_denoised"] - args["uncond_denoised"])

    patched.set_model_sampler_calc_cond_batch_function(calc_cond_batch)
    patched.set_model_sampler_post_cfg_function(post_cfg)
    return patched


def segfree_guider(model_patcher, positive, negative, cfg: float, settings: SegfreeSettings, node: str):
    """A GUIDER for SamplerCustomAdvanced: ComfyUI's own CFGGuider on the patched clone."""
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(apply_segfree_guidance(model_patcher, settings, node))
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


def prompt_words(tokenizer, tokens: dict) -> list[str]:
    """The words of a tokenized prompt, in TokenMap word order (word index i+1 -> words[i])."""
    token_map = token_map_from_tokens(tokenizer, tokens)
    key = next((k for k in ("l", "g", "h") if k in tokens), next(iter(tokens)))
    sub = getattr(tokenizer, getattr(tokenizer, "clip", f"clip_{key}"), None) or getattr(tokenizer, f"clip_{key}", None)
    inv_vocab = getattr(sub, "inv_vocab", {})
    flat = [pair[0] for chunk in tokens[key] for pair in chunk]
    words: dict[int, str] = {}
    for token, word in zip(flat, token_map.words.tolist()):
        if word > 0:
            piece = inv_vocab.get(token, "<emb>") if isinstance(token, int) else "<emb>"
            words[word] = words.get(word, "") + piece.replace("</w>", "")
    return [words[i] for i in sorted(words)]


def record_segmentation(model_patcher, positive, latent: torch.Tensor, start_percent: float, end_percent: float,
                        probes: int, seed: int, node: str) -> torch.Tensor:
    """Run the model's conditional pass on the latent re-noised at `probes` noise levels between
    the two percents, and return the per-word attention summed over every cross-attention
    module and probe: (B, words + 1, h, w) on the latent grid."""
    import comfy.sample
    import comfy.samplers

    cond_dict = positive[0][1]
    recorder = SegmapRecorder(conditioning_token_map(cond_dict, positive[0][0].shape[1]))
    patched = install_attention_hook(model_patcher, node)
    patched.model_options["transformer_options"][SEGMAP_KEY] = recorder
    sampling = patched.get_model_object("model_sampling")
    percents = torch.linspace(start_percent, end_percent, probes).tolist()
    sigmas = torch.tensor([float(sampling.percent_to_sigma(p)) for p in percents] + [0.0])
    sigmas = sigmas.clamp(max=float(sampling.sigma_max), min=float(sampling.sigma_min))
    sigmas[-1] = 0.0

    def probe(model, x, sigmas, extra_args=None, callback=None, disable=None):
        s_in = x.new_ones([x.shape[0]])
        for sigma in sigmas[:-1]:
            noisy = sampling.noise_scaling(sigma, model.noise, model.latent_image)
            model(noisy, sigma * s_in, **(extra_args or {}))
        return x

    guider = comfy.samplers.CFGGuider(patched)
    guider.inner_set_conds({"positive": positive})
    guider.set_cfg(1.0)
    noise = comfy.sample.prepare_noise(latent, seed)
    guider.sample(noise, latent, comfy.samplers.KSAMPLER(probe), sigmas, disable_pbar=True, seed=seed)
    return recorder.total
