"""ComfyUI glue for cross-attention: where the attn2 modules are, which prompt tokens are words,
the one attn2 replacement shared by segmentation-free guidance and the segmentation map, and
segmentation-free guidance as a MODEL patch and as a GUIDER."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..algorithms import segfree as segfree_algo
from . import CrossAttentionSite, NodeInputError, cross_attention_sites, existing_attn2_replacement, model_family

# ---------------------------------------------------------------------------------------------
# Prompt token maps: which context positions are words (CLIPTextEncode drops that knowledge)

TOKEN_MAP_KEY = "mc_token_map"


CLIP_KEYS = ("l", "g", "h")  # ComfyUI's tokenizer output keys of CLIP encoders, in preference order
T5_KEYS = ("t5xxl",)


def _sub_tokenizer(tokenizer, key: str):
    """The SDTokenizer behind one key of a tokenizer's output ("l" -> clip_l, "t5xxl" -> t5xxl)."""
    for name in (getattr(tokenizer, "clip", None), f"clip_{key}", key):
        sub = getattr(tokenizer, name, None) if name else None
        if sub is not None and hasattr(sub, "inv_vocab"):
            return sub
    return None


# Words that never name what a patch shows: articles, prepositions, conjunctions, pronouns and
# auxiliaries (the candidates option "content words" leaves them out of s(p)).
FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every no
of to in on at by for with from into onto over under above below behind between beside near next
left right
and or but nor so yet as than then
is are was were be been being has have had do does did
it its it's he she they them his her their we us our you your i me my
there here which who whom whose what where when while
""".split())


@dataclass
class _Part:
    """One encoder's share of the context: per position a candidate flag, a candidate flag with
    end/padding allowed, a word index (0 for specials), and the text of each word."""
    candidates: list
    with_specials: list
    words: list
    word_texts: list
    content: list = field(default_factory=list)  # per position: a candidate whose word is not a function word


def _read_part(sub, chunks, t5_style: bool) -> _Part:
    """Walk one encoder's token chunks. CLIP BPE marks a word's last piece with '</w>';
    SentencePiece (T5) marks a word's first piece with '▁'. Embeddings (textual inversion,
    not ints) are words of their own."""
    specials = {getattr(sub, name, None) for name in ("start_token", "end_token", "pad_token")} - {None}
    start = getattr(sub, "start_token", None)
    inv_vocab = getattr(sub, "inv_vocab", {})
    part = _Part([], [], [], [])
    open_word = False
    for chunk in chunks:
        for pair in chunk:
            token = pair[0]
            if isinstance(token, int) and token in specials:
                part.candidates.append(False)
                part.with_specials.append(token != start)
                part.words.append(0)
                open_word = False
                continue
            piece = inv_vocab.get(token, "") if isinstance(token, int) else None
            if piece is None:  # an embedding
                starts, ends, text = True, True, "<emb>"
            elif t5_style:
                starts, ends, text = piece.startswith("\u2581") or not open_word, False, piece.replace("\u2581", "")
            else:
                starts, ends, text = not open_word, piece.endswith("</w>"), piece.replace("</w>", "")
            if starts or not part.word_texts:
                part.word_texts.append(text)
            else:
                part.word_texts[-1] += text
            part.candidates.append(True)
            part.with_specials.append(True)
            part.words.append(len(part.word_texts))
            open_word = not ends
    # from this encoder's own word numbering (a T5/CLIP alignment renumbers `words` later)
    part.content = [c and w > 0 and _normalised(part.word_texts[w - 1]) not in FUNCTION_WORDS
                    for c, w in zip(part.candidates, part.words)]
    return part


def _normalised(text: str) -> str:
    return "".join(c for c in text.lower() if c.isalnum())


def _align(clip: _Part, t5: _Part) -> list | None:
    """For each T5 word, the CLIP word index it matches (1-based), or None when the two
    tokenizations cannot be matched. CLIP splits punctuation into words of its own and
    lower-cases; a T5 word may so span several CLIP words (then it takes the first one's index,
    and the later ones are merged into it by the caller)."""
    mapping = []
    i = 0
    for t5_text in t5.word_texts:
        target = _normalised(t5_text)
        if not target:  # a punctuation-only T5 word: attach it to the previous word
            mapping.append(mapping[-1] if mapping else None)
            continue
        acc, first = "", None
        while i < len(clip.word_texts) and len(acc) < len(target):
            piece = _normalised(clip.word_texts[i])
            i += 1
            if not piece:
                continue
            first = first or i
            acc += piece
        if acc != target:
            return None
        mapping.append(first)
    return mapping


def _token_parts(tokenizer, tokens: dict) -> tuple[dict, list]:
    """The CLIP and T5 parts of a tokenized prompt, with one word numbering shared by both when
    their words match (so a word is edited in both encoders' tokens at once), and the words."""
    clip_key = next((k for k in CLIP_KEYS if k in tokens), None)
    t5_key = next((k for k in T5_KEYS if k in tokens), None)
    if clip_key is None and t5_key is None:
        clip_key = next(iter(tokens))
    parts = {}
    if clip_key is not None:
        parts["clip"] = _read_part(_sub_tokenizer(tokenizer, clip_key), tokens[clip_key], t5_style=False)
    if t5_key is not None:
        parts["t5"] = _read_part(_sub_tokenizer(tokenizer, t5_key), tokens[t5_key], t5_style=True)
    if "clip" in parts and "t5" in parts:
        clip, t5 = parts["clip"], parts["t5"]
        mapping = _align(clip, t5)
        if mapping is not None and all(m is not None for m in mapping):
            # merge CLIP words that one T5 word spans ("dog" "," <- "dog,"): renumber CLIP words
            # by the T5 word they belong to
            clip_to_t5 = {}
            for j, first in enumerate(mapping, start=1):
                clip_to_t5.setdefault(first, j)
            current, renumber = 1, {}
            for w in range(1, len(clip.word_texts) + 1):
                current = clip_to_t5.get(w, current)
                renumber[w] = current
            clip.words = [renumber.get(w, 0) if w else 0 for w in clip.words]
            words = t5.word_texts
        else:
            offset = len(clip.word_texts)
            t5.words = [w + offset if w else 0 for w in t5.words]
            words = clip.word_texts + t5.word_texts
        return parts, words
    only = next(iter(parts.values()))
    return parts, only.word_texts


def _as_map(*parts: _Part) -> segfree_algo.TokenMap:
    return segfree_algo.TokenMap(torch.tensor([c for p in parts for c in p.candidates], dtype=torch.bool),
                                 torch.tensor([w for p in parts for w in p.words], dtype=torch.long),
                                 torch.tensor([c for p in parts for c in p.with_specials], dtype=torch.bool),
                                 torch.tensor([c for p in parts for c in p.content], dtype=torch.bool))


def token_map_from_tokens(tokenizer, tokens: dict, length: int | None = None, uses_t5: bool = True) -> segfree_algo.TokenMap | None:
    """The TokenMap of a tokenized prompt (ComfyUI's `clip.tokenize` output: per encoder key, a
    list of token chunks of (token, weight) pairs; weights do not matter here). Several CLIP
    chunks (prompts over 75 tokens) are concatenated as ComfyUI concatenates their contexts.

    The context layout follows ComfyUI's encoders: SD1/SDXL contexts are CLIP's; SD3's are
    CLIP-L/G then T5-XXL along the sequence (CLIP only without a T5, T5 only without CLIPs);
    Flux's are T5-XXL's alone (its CLIP-L only gives the pooled vector). Given the context
    `length`, the layout that has it is returned (None if none has); without a length, the
    CLIP part (the SD1/SDXL layout)."""
    parts, _ = _token_parts(tokenizer, tokens)
    clip, t5 = parts.get("clip"), parts.get("t5")
    if length is None:
        return _as_map(clip or t5)
    layouts = []
    if uses_t5 and clip is not None and t5 is not None:
        layouts.append((clip, t5))
    if uses_t5 and t5 is not None:
        layouts.append((t5,))
    if clip is not None:
        layouts.append((clip,))
    for layout in layouts:
        if sum(len(p.candidates) for p in layout) == length:
            return _as_map(*layout)
    return None


def prompt_words(tokenizer, tokens: dict) -> list[str]:
    """The words of a tokenized prompt, in TokenMap word order (word index i+1 -> words[i])."""
    return _token_parts(tokenizer, tokens)[1]


class _TokenMapCLIPMixin:
    """A CLIP whose conditioning carries the prompt's TokenMap (key `mc_token_map`), so that
    attention edits know which positions are words. Clones stay of this kind, so a LoRA loader
    placed after it keeps the behaviour."""

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict={}, show_pbar=True):
        out = super().encode_from_tokens_scheduled(tokens, unprojected=unprojected, add_dict=add_dict, show_pbar=show_pbar)
        uses_t5 = getattr(self.cond_stage_model, "t5xxl", None) is not None
        try:
            for cond, extra in out:
                token_map = token_map_from_tokens(self.tokenizer, tokens, cond.shape[1], uses_t5)
                if token_map is not None:
                    extra[TOKEN_MAP_KEY] = token_map
        except Exception:  # an exotic tokenizer: the attention edit falls back to its default map
            logging.warning("[More Control] could not read the prompt's tokens; all tokens but BOS are candidates")
        return out

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


def conditioning_token_map(cond_dict: dict, length: int, joint: bool = False) -> segfree_algo.TokenMap:
    """The prompt's TokenMap, or without one every position but CLIP chunks' BOS (UNets) or
    every position (joint-attention models, whose T5 context has no BOS)."""
    token_map = cond_dict.get(TOKEN_MAP_KEY)
    if token_map is None or length % token_map.candidates.shape[0]:
        return segfree_algo.default_token_map(length, None if joint else 77)
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

    def __init__(self, token_map: segfree_algo.TokenMap, latent_hw=None):
        self.token_map = token_map
        self.latent_hw = latent_hw
        self.total = None

    def add(self, weights: torch.Tensor, latent_hw=None, grid=None):
        token_map = self.token_map.fit(weights.shape[-1], weights.device)
        scores = segfree_algo.accumulate_word_scores(weights, token_map, latent_hw or self.latent_hw, grid).cpu()
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


def uses_joint_attention(model_patcher) -> bool:
    """SD3/SD3.5 and Flux-family: text and image tokens in one attention (glue.joint_attention)."""
    from .joint_attention import joint_attention_sites

    return not cross_attention_sites(model_patcher) and bool(joint_attention_sites(model_patcher))


def install_attention_hook(model_patcher, node: str, single_blocks: bool = False):
    """Clone the MODEL and put the shared hook at every cross-attention site (UNets: attn2
    replacements) or joint-attention block (SD3, Flux: dit replacements; Flux single-stream
    blocks too when asked), wrapping any replacement already there. Raises a NodeInputError
    naming the family for models it cannot edit."""
    sites = cross_attention_sites(model_patcher)
    if not sites:
        from .joint_attention import install_joint_attention_hook

        return install_joint_attention_hook(model_patcher, node, single_blocks)
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
    content_words: bool = False  # only content words may be s(p) (not "a", "of", "to"...)
    single_blocks: bool = False  # Flux: edit the single-stream blocks' image-to-text weights too


def apply_segfree_guidance(model_patcher, settings: SegfreeSettings, node: str):
    """Clone the MODEL and make every sampler run segmentation-free guidance from
    `start_percent` on. Before that the sampler's own CFG (the user's cfg and negative) runs
    untouched. After it, the negative is replaced by the positive prompt run with the attention
    edit (marked as the uncond chunk, so the cross-attention hook knows which rows to edit),
    and a post-CFG hook turns ComfyUI's combine into eq. 11."""
    import comfy.samplers

    patched = install_attention_hook(model_patcher, node, settings.single_blocks)
    joint = uses_joint_attention(model_patcher)
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
                token_map = conditioning_token_map(cond, length, joint)
                if settings.include_specials:
                    token_map = token_map.including_specials()
                elif settings.content_words:
                    token_map = token_map.content_words_only()
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
        cond, modified = args["cond_denoised"], args["uncond_denoised"]
        # ComfyUI combined ε̄ + s(cond - ε̄) with the user's s (at cfg 1: cond alone); whatever
        # earlier post-CFG hooks added to that combine is kept on top of eq. 11.
        comfy_combine = modified + args["cond_scale"] * (cond - modified)
        return segfree_algo.segfree_combine(cond, modified, settings.segfree_cfg) + (denoised - comfy_combine)

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


def record_segmentation(model_patcher, positive, latent: torch.Tensor, start_percent: float, end_percent: float,
                        probes: int, seed: int, node: str, content_words: bool = False) -> torch.Tensor:
    """Run the model's conditional pass on the latent re-noised at `probes` noise levels between
    the two percents, and return the per-word attention summed over every cross-attention
    module and probe: (B, words + 1, h, w) on the latent grid."""
    import comfy.sample
    import comfy.samplers

    cond_dict = positive[0][1]
    joint = uses_joint_attention(model_patcher)
    token_map = conditioning_token_map(cond_dict, positive[0][0].shape[1], joint)
    recorder = SegmapRecorder(token_map.content_words_only() if content_words else token_map, tuple(latent.shape[-2:]))
    patched = install_attention_hook(model_patcher, node, single_blocks=False)
    patched.model_options["transformer_options"][SEGMAP_KEY] = recorder
    if joint:
        from .joint_attention import GRID_KEY, dit_patch_grid

        patched.model_options["transformer_options"][GRID_KEY] = dit_patch_grid(model_patcher, tuple(latent.shape[-2:]))
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
