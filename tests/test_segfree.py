"""Segmentation-free guidance: the attention edit, the switch, the combine, and the node paths."""
from __future__ import annotations

import math

import pytest
import torch

import tiny_models


def model_fingerprint(model_patcher) -> str:
    return tiny_models.fingerprint(model_patcher.model.diffusion_model, patcher=model_patcher)


def ksample(comfy_nodes, model, positive, negative, cfg=6.0, steps=4, seed=7, latent=None, sampler="euler"):
    latent = latent if latent is not None else {"samples": torch.zeros(1, 4, 8, 8)}
    (out,) = comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler, "normal", positive, negative, latent, denoise=1.0)
    return out["samples"]


def run_node(node_cls, **kwargs):
    return node_cls.execute(**kwargs).result


SETTINGS = dict(segfree_scale=10.0, segfree_cfg=2.0, attention_heads="mean over heads", candidates="prompt words")


# ---------------------------------------------------------------------------------------------
# The attention edit, against a hand computation

def hand_segfree(q, k, v, heads, a, candidates, words, per_head=False):
    """Loops over patches: softmax, argmax over candidate tokens, weight of that token (and its
    word) times -a, no renormalisation, weights times V."""
    b, n, inner = q.shape
    d = inner // heads
    out = torch.zeros(b, n, inner, dtype=torch.float64)
    for bi in range(b):
        w = torch.zeros(heads, n, k.shape[1], dtype=torch.float64)
        for h in range(heads):
            qh = q[bi, :, h * d:(h + 1) * d].double()
            kh = k[bi, :, h * d:(h + 1) * d].double()
            w[h] = torch.softmax(qh @ kh.T / math.sqrt(d), dim=-1)
        for h in range(heads):
            for p in range(n):
                scores = w[h, p] if per_head else w[:, p].mean(0)
                best, best_i = -1.0, None
                for i in range(k.shape[1]):
                    if candidates[i] and scores[i] > best:
                        best, best_i = scores[i], i
                row = w[h, p].clone()
                for i in range(k.shape[1]):
                    if i == best_i or (words[best_i] > 0 and words[i] == words[best_i]):
                        row[i] = -a * row[i]
                out[bi, p, h * d:(h + 1) * d] = row @ v[bi, :, h * d:(h + 1) * d].double()
    return out


@pytest.mark.parametrize("per_head", [False, True])
def test_attention_edit_matches_hand_computation(sf, per_head):
    g = torch.Generator().manual_seed(0)
    heads, d, n, length = 3, 4, 6, 9
    q, k, v = (torch.randn(2, m, heads * d, generator=g) for m in (n, length, length))
    candidates = torch.tensor([False, True, True, True, True, False, False, True, True])
    words = torch.tensor([0, 1, 2, 2, 3, 0, 0, 4, 5])  # word 2 spans two tokens
    token_map = sf.TokenMap(candidates, words)
    got = sf.segfree_attention(q, k, v, heads, 10.0, token_map, per_head)
    want = hand_segfree(q, k, v, heads, 10.0, candidates, words, per_head)
    assert torch.allclose(got.double(), want, atol=1e-5), (got.double() - want).abs().max()
    # a = 0 ignores the selected word: then the weights of a patch no longer sum to one
    plain = sf.apply_weights(sf.attention_weights(q, k, heads), v, heads)
    assert not torch.allclose(got, plain)


def test_replacement_edits_only_the_uncond_chunk(sf, glue):
    """Through the installed attn2 replacement: chunk 0 (positive) is plain attention, chunk 1
    (marked uncond, the modified pass) is the hand computation with BOS never selected."""
    import comfy.ldm.modules.attention as attention

    g = torch.Generator().manual_seed(1)
    heads, d, n, length = 2, 8, 5, 77
    q = torch.randn(2, n, heads * d, generator=g)
    k = torch.randn(1, length, heads * d, generator=g).repeat(2, 1, 1)
    v = torch.randn(1, length, heads * d, generator=g).repeat(2, 1, 1)
    k[:, 0] *= 8  # make BOS dominate the softmax, as in real models
    candidates = torch.zeros(length, dtype=torch.bool)
    candidates[1:6] = True
    words = torch.tensor([0, 1, 2, 3, 4, 5] + [0] * 71)
    step = glue.SegfreeStep(10.0, False, {"pos": sf.TokenMap(candidates, words)})
    extra = {"n_heads": heads, "dim_head": d, "attn_precision": None, "cond_or_uncond": [0, 1],
             "uuids": ["pos", "pos"], glue.SEGFREE_KEY: step}
    out = glue.make_attn2_replacement()(q, k, v, extra)
    plain = attention.optimized_attention(q[:1], k[:1], v[:1], heads)
    assert torch.equal(out[:1], plain)
    want = hand_segfree(q[1:], k[1:], v[1:], heads, 10.0, candidates, words)
    assert torch.allclose(out[1:].double(), want, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Token maps from ComfyUI's tokenizer

def test_token_map_words_weights_and_chunks(glue, tiny_clip):
    tok = tiny_clip.tokenize("a cute zorblaxian white dog next to a cat")
    tm = glue.token_map_from_tokens(tiny_clip.tokenizer, tok)
    words = glue.prompt_words(tiny_clip.tokenizer, tok)
    assert words == ["a", "cute", "zorblaxian", "white", "dog", "next", "to", "a", "cat"]
    n_tokens = int(tm.candidates.sum())
    assert n_tokens > len(words)  # "zorblaxian" is several BPE tokens, grouped into one word
    assert not tm.candidates[0] and tm.words[0] == 0  # BOS
    assert not tm.candidates[n_tokens + 1:].any()  # EOS and padding are not words

    weighted = glue.token_map_from_tokens(tiny_clip.tokenizer, tiny_clip.tokenize("a cute (zorblaxian:1.3) white dog next to a cat"))
    assert torch.equal(weighted.words, tm.words) and torch.equal(weighted.candidates, tm.candidates)

    long_prompt = ", ".join(["a red circle to the left of a small blue square"] * 10)
    long_tm = glue.token_map_from_tokens(tiny_clip.tokenizer, tiny_clip.tokenize(long_prompt))
    assert long_tm.candidates.shape[0] % 77 == 0 and long_tm.candidates.shape[0] >= 154
    assert not long_tm.candidates[::77].any()  # every chunk's BOS
    cond = tiny_models.encode(glue.clip_with_token_maps(tiny_clip), long_prompt)
    assert cond[0][0].shape[1] == long_tm.candidates.shape[0]
    assert torch.equal(cond[0][1][glue.TOKEN_MAP_KEY].words, long_tm.words)


# ---------------------------------------------------------------------------------------------
# Sampling through ComfyUI's own KSampler

@pytest.fixture(scope="module")
def prompts(tiny_clip, glue):
    clip = glue.clip_with_token_maps(tiny_clip)
    return {
        "positive": tiny_models.encode(clip, "a cute maltese white dog next to a cat"),
        "negative": tiny_models.encode(clip, "blurry"),
        "empty": tiny_models.encode(clip, ""),
        "plain_positive": tiny_models.encode(tiny_clip, "a cute maltese white dog next to a cat"),
    }


def test_start_percent_one_is_plain_cfg_bit_for_bit(comfy_nodes, nodes_sf, tiny_sd15, prompts):
    (patched, _) = run_node(nodes_sf.SegmentationFreeGuidance, model=tiny_sd15, start_percent=1.0, **SETTINGS)
    for sampler in ("euler", "dpmpp_2m"):
        plain = ksample(comfy_nodes, tiny_sd15, prompts["positive"], prompts["negative"], sampler=sampler)
        guided = ksample(comfy_nodes, patched, prompts["positive"], prompts["negative"], sampler=sampler)
        assert torch.equal(plain, guided)


def reference_edit(q, k, v, heads, a, token_map, dtype=None):
    """The modified cross-attention of the ε̄ pass written out here, independently of the pack's
    code (checked against the loop computation above): per head softmax, the head-averaged argmax
    among the candidate tokens, that token and the rest of its word times -a, no renormalisation."""
    b, n, inner = q.shape
    d = inner // heads
    qh, kh, vh = (t.reshape(b, -1, heads, d).transpose(1, 2).double() for t in (q, k, v))
    w = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)  # (B, H, N, L)
    candidates, words = token_map.candidates.to(q.device), token_map.words.to(q.device)
    best = w.mean(1).masked_fill(~candidates, float("-inf")).argmax(-1)  # (B, N)
    word = words[best][..., None]
    selected = torch.nn.functional.one_hot(best, k.shape[1]).bool() | ((words == word) & (word > 0))
    w = torch.where(selected[:, None], -a * w, w)
    return (w @ vh).transpose(1, 2).reshape(b, n, inner).to(dtype or q.dtype)


def test_reference_edit_is_the_hand_computation(sf):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, m, 12, generator=g) for m in (7, 9, 9))
    candidates = torch.tensor([False, True, True, True, True, True, False, False, True])
    words = torch.tensor([0, 1, 2, 2, 3, 4, 0, 0, 5])
    got = reference_edit(q, k, v, 3, 10.0, sf.TokenMap(candidates, words))
    assert torch.allclose(got.double(), hand_segfree(q, k, v, 3, 10.0, candidates, words), atol=1e-5)


def model_with_edit_everywhere(glue, model, token_map, a):
    """A clone whose every cross-attention runs `reference_edit` on all rows: its cond-only
    prediction is ε̄(z, c), the paper's modified pass."""
    edited = model.clone()
    for site in glue.cross_attention_sites(model):
        edited.set_model_attn2_replace(lambda q, k, v, extra: reference_edit(q, k, v, extra["n_heads"], a, token_map), *site.key)
    return edited


def test_after_switch_the_combine_is_eq_11(comfy_nodes, nodes_sf, glue, tiny_sd15, tiny_clip, prompts):
    """Eq. 11, ε̂ = ε + w̄ (ε − ε̄), through the node. One euler step from pure noise returns the
    model's prediction itself, so the one-step output must be cond + w̄ (cond − ε̄) for every w̄, with
    ε̄ from a model whose cross-attention runs the edit written out in this file."""
    def one_step(model, cfg, negative="negative"):
        return ksample(comfy_nodes, model, prompts["positive"], prompts[negative], cfg=cfg, steps=1)

    def node_model(**settings):
        return run_node(nodes_sf.SegmentationFreeGuidance, model=tiny_sd15, start_percent=0.0, **{**SETTINGS, **settings})[0]

    token_map = glue.token_map_from_tokens(tiny_clip.tokenizer, tiny_clip.tokenize("a cute maltese white dog next to a cat"))
    cond = one_step(tiny_sd15, 1.0)
    modified = one_step(model_with_edit_everywhere(glue, tiny_sd15, token_map, SETTINGS["segfree_scale"]), 1.0)
    difference = (cond - modified).abs().max()
    print(f"\none step: max |cond - modified| {float(difference):.3f} (outputs up to {float(cond.abs().max()):.1f})")
    assert difference > 1.0  # the edit moves the prediction: the coefficient is visible
    for segfree_cfg in (0.0, 1.0, 3.5):
        out = one_step(node_model(segfree_cfg=segfree_cfg), 4.0)
        want = cond + segfree_cfg * (cond - modified)
        # float32 rounding of outputs of size ~100; a wrong coefficient (even 2% off) is 1000x larger
        assert (out - want).abs().max() < 1e-5 * (1 + segfree_cfg) * float(cond.abs().max()), segfree_cfg

    # whole runs: w̄ = 0 is the cond-only run; the user's cfg and negative no longer matter after the switch
    cond_only = ksample(comfy_nodes, tiny_sd15, prompts["positive"], prompts["negative"], cfg=1.0)
    assert torch.allclose(ksample(comfy_nodes, node_model(segfree_cfg=0.0), prompts["positive"], prompts["negative"], cfg=7.0),
                          cond_only, rtol=1e-4, atol=1e-4)
    patched = node_model()
    a = ksample(comfy_nodes, patched, prompts["positive"], prompts["negative"], cfg=4.0)
    b = ksample(comfy_nodes, patched, prompts["positive"], prompts["empty"], cfg=9.0)
    assert torch.allclose(a, b, atol=1e-4)
    assert (a - cond_only).abs().max() > 1e-2


def test_switch_mid_schedule_matches_cfg_before(comfy_nodes, nodes_sf, tiny_sd15, prompts):
    """Steps before start_percent are plain CFG: a run stopped before the switch equals CFG."""
    (patched, _) = run_node(nodes_sf.SegmentationFreeGuidance, model=tiny_sd15, start_percent=0.5, **SETTINGS)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    full_plain = ksample(comfy_nodes, tiny_sd15, prompts["positive"], prompts["negative"], steps=6, latent=latent)
    full_sfg = ksample(comfy_nodes, patched, prompts["positive"], prompts["negative"], steps=6, latent=latent)
    assert (full_plain - full_sfg).abs().max() > 1e-3
    (early_plain,) = comfy_nodes.common_ksampler(tiny_sd15, 7, 6, 6.0, "euler", "normal", prompts["positive"], prompts["negative"],
                                                 latent, start_step=0, last_step=2, force_full_denoise=False)
    (early_sfg,) = comfy_nodes.common_ksampler(patched, 7, 6, 6.0, "euler", "normal", prompts["positive"], prompts["negative"],
                                               latent, start_step=0, last_step=2, force_full_denoise=False)
    assert torch.equal(early_plain["samples"], early_sfg["samples"])


@pytest.mark.parametrize("case", ["batch2", "cfg1", "odd_size", "long_prompt", "plain_clip"])
def test_variants_run_and_differ_from_cfg(comfy_nodes, nodes_sf, glue, tiny_sd15, tiny_clip, prompts, case):
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    positive, cfg = prompts["positive"], 6.0
    if case == "batch2":
        latent = {"samples": torch.zeros(2, 4, 8, 8)}
    elif case == "cfg1":
        cfg = 1.0
    elif case == "odd_size":
        latent = {"samples": torch.zeros(1, 4, 10, 6)}  # 80x48 pixels
    elif case == "long_prompt":
        positive = tiny_models.encode(glue.clip_with_token_maps(tiny_clip), ", ".join(["a (red:1.2) circle left of a blue square"] * 9))
    elif case == "plain_clip":
        positive = prompts["plain_positive"]
    (patched, _) = run_node(nodes_sf.SegmentationFreeGuidance, model=tiny_sd15, start_percent=0.0, **SETTINGS)
    out = ksample(comfy_nodes, patched, positive, prompts["negative"], cfg=cfg, latent=latent)
    ref = ksample(comfy_nodes, tiny_sd15, positive, prompts["negative"], cfg=cfg, latent=latent)
    assert out.shape == latent["samples"].shape and torch.isfinite(out).all()
    assert (out - ref).abs().max() > 1e-3
    if case == "batch2":  # batching keeps the images apart: the first is the single-image run (same noise)
        single = ksample(comfy_nodes, patched, positive, prompts["negative"], cfg=cfg)
        assert torch.allclose(out[:1], single, rtol=1e-4, atol=1e-4) and (out[0] - out[1]).abs().max() > 1e-2
    if case == "cfg1":  # ComfyUI's cfg-1 shortcut must not skip the modified pass: the user's cfg does not matter
        assert torch.allclose(out, ksample(comfy_nodes, patched, positive, prompts["negative"], cfg=6.0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("option,value", [("attention_heads", "per head"), ("candidates", "prompt words + end/padding")])
def test_each_option_changes_the_result(comfy_nodes, nodes_sf, tiny_sd15, prompts, option, value):
    def run(**settings):
        (patched, _) = run_node(nodes_sf.SegmentationFreeGuidance, model=tiny_sd15, start_percent=0.0, **{**SETTINGS, **settings})
        return ksample(comfy_nodes, patched, prompts["positive"], prompts["negative"])

    assert (run(**{option: value}) - run()).abs().max() > 1e-3


def recorded_token_maps(glue, patched) -> list:
    """Wrap the installed replacement at one site and record the token maps of the edited passes."""
    site = glue.cross_attention_sites(patched)[0]
    inner = patched.model_options["transformer_options"]["patches_replace"]["attn2"][site.key]
    seen = []

    def recording(q, k, v, extra):
        step = extra.get(glue.SEGFREE_KEY)
        if step is not None:
            seen.extend(step.token_maps.values())
        return inner(q, k, v, extra)

    patched.set_model_attn2_replace(recording, *site.key)
    return seen


@pytest.mark.parametrize("candidates", ["prompt words", "prompt words + end/padding", "content words"])
def test_end_and_padding_become_candidates_when_asked(comfy_nodes, nodes_sf, glue, tiny_sd15, tiny_clip, prompts, candidates):
    (patched, _) = run_node(nodes_sf.SegmentationFreeGuidance, model=tiny_sd15, start_percent=0.0,
                            **{**SETTINGS, "candidates": candidates})
    seen = recorded_token_maps(glue, patched)
    ksample(comfy_nodes, patched, prompts["positive"], prompts["negative"], steps=1)
    words = glue.token_map_from_tokens(tiny_clip.tokenizer, tiny_clip.tokenize("a cute maltese white dog next to a cat")).words
    assert seen and all(torch.equal(m.words.cpu(), words) for m in seen)  # word grouping is kept either way
    n_tokens = int((words > 0).sum())
    expected = torch.zeros(77, dtype=torch.bool)
    if candidates == "prompt words":
        expected[1:n_tokens + 1] = True  # the prompt's tokens only
    elif candidates == "content words":  # "a cute maltese white dog next to a cat": not a, next, to
        texts = glue.prompt_words(tiny_clip.tokenizer, tiny_clip.tokenize("a cute maltese white dog next to a cat"))
        assert [t for t in texts if t not in glue.FUNCTION_WORDS] == ["cute", "maltese", "white", "dog", "cat"]
        expected = torch.tensor([w > 0 and texts[w - 1] not in glue.FUNCTION_WORDS for w in words.tolist()])
        assert int(expected.sum()) < n_tokens
    else:
        expected[1:] = True  # every position but BOS: end and padding too
    assert all(torch.equal(m.candidates.cpu(), expected) for m in seen)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_precision_weights(comfy_nodes, glue, tiny_clip, prompts, dtype, tolerance):
    """With half-precision weights, every edited attention call of a run equals the edit computed in
    float64 from the same inputs, within the rounding of a half-precision output (relative to its
    largest value: fp16 2e-3, bf16 1e-2), at every site and step. Whole runs are not compared with
    float32 ones: this random tiny UNet alone turns half-precision rounding into 6% (fp16) to 17%
    (bf16) of its output, and flips near-tied argmaxes, with or without guidance."""
    model = tiny_models.tiny_model("sd15", seed=0, dtype=dtype)
    patched = glue.apply_segfree_guidance(model, glue.SegfreeSettings(start_percent=0.0), "test")
    token_map = glue.token_map_from_tokens(tiny_clip.tokenizer, tiny_clip.tokenize("a cute maltese white dog next to a cat"))
    errors = []
    for site in glue.cross_attention_sites(patched):
        inner = patched.model_options["transformer_options"]["patches_replace"]["attn2"][site.key]

        def checking(q, k, v, extra, inner=inner):
            out = inner(q, k, v, extra)
            kinds = extra["cond_or_uncond"]
            if glue.SEGFREE_KEY in extra and 1 in kinds:
                rows = q.shape[0] // len(kinds)
                part = slice(kinds.index(1) * rows, (kinds.index(1) + 1) * rows)
                want = reference_edit(q[part], k[part], v[part], extra["n_heads"], 10.0, token_map, torch.float64)
                assert out.dtype == dtype
                errors.append(float((out[part].double() - want).abs().max() / want.abs().max()))
            return out

        patched.set_model_attn2_replace(checking, *site.key)
    out = ksample(comfy_nodes, patched, prompts["positive"], prompts["negative"], steps=2)
    assert torch.isfinite(out).all()
    print(f"\n{dtype}: {len(errors)} edited attention calls, largest relative error {max(errors):.1e}")
    assert len(errors) == 2 * len(glue.cross_attention_sites(model)) and max(errors) < tolerance


@pytest.mark.parametrize("kind", ["sd21", "sdxl"])
def test_other_unet_families(comfy_nodes, glue, kind):
    model = tiny_models.tiny_model(kind, seed=4)
    sites = glue.cross_attention_sites(model)
    assert len(sites) >= 5  # input, middle and output blocks
    if kind == "sdxl":
        positive, negative = tiny_models.sdxl_conditioning(1), tiny_models.sdxl_conditioning(2)
    else:
        g = torch.Generator().manual_seed(3)
        positive, negative = [[torch.randn(1, 77, 1024, generator=g), {}]], [[torch.randn(1, 77, 1024, generator=g), {}]]
    calls = []
    patched = glue.apply_segfree_guidance(model, glue.SegfreeSettings(start_percent=0.0), "test")
    for site in sites:
        inner = patched.model_options["transformer_options"]["patches_replace"]["attn2"][site.key]
        def counting(q, k, v, extra, inner=inner):
            calls.append(extra["cond_or_uncond"])
            return inner(q, k, v, extra)
        patched.set_model_attn2_replace(counting, *site.key)
    out = ksample(comfy_nodes, patched, positive, negative, steps=2)
    ref = ksample(comfy_nodes, model, positive, negative, steps=2)
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-3
    assert len(calls) == 2 * len(sites) and all(1 in c for c in calls)


def test_wraps_another_packs_attn2_replacement(comfy_nodes, glue, nodes_sf, tiny_sd15, prompts):
    """A replacement installed before (at the 2-part key, as many packs do) still runs, for the
    positive rows, after the switch too."""
    import comfy.ldm.modules.attention as attention

    seen = []

    def other_pack(q, k, v, extra):
        seen.append(list(extra["cond_or_uncond"]))
        return attention.optimized_attention(q, k, v, extra["n_heads"]) * 1.0

    other = tiny_sd15.clone()
    other.set_model_attn2_replace(other_pack, "middle", 0)
    (patched, _) = run_node(nodes_sf.SegmentationFreeGuidance, model=other, start_percent=0.5, **SETTINGS)
    ksample(comfy_nodes, patched, prompts["positive"], prompts["negative"], steps=4)
    assert [0, 1] in [sorted(c) for c in seen]  # before the switch: both chunks
    assert [0] in seen  # after: the positive chunk; the edited chunk is ours
    assert "middle" not in str(tiny_sd15.model_options)  # the user's model untouched


def test_user_model_and_clip_unchanged(comfy_nodes, nodes_sf, tiny_sd15, tiny_clip, prompts):
    before = model_fingerprint(tiny_sd15)
    clip_before = (type(tiny_clip), dict(tiny_clip.patcher.model_options))
    (patched, clip) = run_node(nodes_sf.SegmentationFreeGuidance, model=tiny_sd15, clip=tiny_clip, start_percent=0.0, **SETTINGS)
    ksample(comfy_nodes, patched, tiny_models.encode(clip, "a dog and a cat"), prompts["negative"])
    assert model_fingerprint(tiny_sd15) == before
    assert (type(tiny_clip), dict(tiny_clip.patcher.model_options)) == clip_before
    assert "sampler_calc_cond_batch_function" not in tiny_sd15.model_options
    assert clip is not tiny_clip


def test_empty_prompt_after_switch_is_a_clear_error(comfy_nodes, nodes_sf, glue, tiny_sd15, prompts):
    (patched, _) = run_node(nodes_sf.SegmentationFreeGuidance, model=tiny_sd15, start_percent=0.5, **SETTINGS)
    with pytest.raises(glue.NodeInputError, match="MC_SegmentationFreeGuidance: input 'positive'"):
        ksample(comfy_nodes, patched, prompts["empty"], prompts["negative"])


def test_model_without_cross_attention_is_a_clear_error(nodes_sf, glue):
    bare = tiny_models.tiny_model("sd15", seed=0)
    for module in bare.model.diffusion_model.modules():
        if hasattr(module, "attn2"):
            module.attn2 = None  # a UNet with self-attention only
    with pytest.raises(glue.NodeInputError, match="MC_SegmentationFreeGuidance: input 'model'.*no cross-attention"):
        run_node(nodes_sf.SegmentationFreeGuidance, model=bare, start_percent=0.4, **SETTINGS)


def test_guider_with_sampler_custom_advanced(comfy_nodes, nodes_sf, tiny_sd15, prompts):
    import comfy_extras.nodes_custom_sampler as custom

    def run(guider):
        noise = custom.RandomNoise.execute(noise_seed=7).result[0]
        sampler = custom.KSamplerSelect.execute(sampler_name="euler").result[0]
        sigmas = custom.BasicScheduler.execute(model=tiny_sd15, scheduler="normal", steps=4, denoise=1.0).result[0]
        return custom.SamplerCustomAdvanced.execute(noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                                                    latent_image={"samples": torch.zeros(1, 4, 8, 8)}).result[0]["samples"]

    kwargs = dict(model=tiny_sd15, positive=prompts["positive"], negative=prompts["negative"], cfg=6.0, **SETTINGS)
    (never,) = run_node(nodes_sf.SegmentationFreeGuider, start_percent=1.0, **kwargs)
    (cfg_guider,) = custom.CFGGuider.execute(model=tiny_sd15, positive=prompts["positive"], negative=prompts["negative"], cfg=6.0).result
    assert torch.equal(run(never), run(cfg_guider))
    (sfg,) = run_node(nodes_sf.SegmentationFreeGuider, start_percent=0.3, **kwargs)
    assert (run(sfg) - run(cfg_guider)).abs().max() > 1e-3


def test_content_words_only_keeps_a_prompt_of_function_words(glue, tiny_clip):
    """'content words' falls back to every prompt word when no content word is left (never an empty candidate set)."""
    only_function = glue.token_map_from_tokens(tiny_clip.tokenizer, tiny_clip.tokenize("a the of"))
    assert not only_function.content.any() and torch.equal(only_function.content_words_only().candidates, only_function.candidates)
    mixed = glue.token_map_from_tokens(tiny_clip.tokenizer, tiny_clip.tokenize("a red circle to the left of a blue square"))
    kept = mixed.content_words_only()
    assert 0 < int(kept.candidates.sum()) < int(mixed.candidates.sum())
    assert torch.equal(kept.fit(154, "cpu").candidates, kept.candidates.repeat(2))  # the batching repeat keeps the choice


def test_word_scores_and_labels_on_hand_made_attention(sf):
    """accumulate_word_scores and segmentation_from_scores on attention built by hand over a 4x6 patch
    grid (not square, so a transposed layout shows) under an 8x12 latent. Tokens: BOS, 'red', 'cir' +
    'cle' (one word of two tokens), 'blue', EOS, two paddings; EOS and padding are candidates of no word."""
    candidates = torch.tensor([False, True, True, True, True, True, True, True])
    words = torch.tensor([0, 1, 2, 2, 3, 0, 0, 0])
    grid = torch.tensor([[1, 1, 2, 2, 3, 3],
                         [1, 2, 2, 2, 3, 3],
                         [1, 1, 3, 2, 3, 3],
                         [2, 1, 1, 2, 3, 0]])  # 0: a patch whose strongest candidate is EOS
    per_patch = {  # (head 0, head 1) weights on tokens 1..7; BOS gets the rest of each row
        1: ([0.30, 0.10, 0.00, 0.05, 0, 0, 0], [0.20, 0.00, 0.10, 0.10, 0, 0, 0]),
        2: ([0.30, 0.20, 0.20, 0.00, 0, 0, 0], [0.25, 0.15, 0.15, 0.00, 0, 0, 0]),  # 'red' is the largest token, 'circle' the largest word
        3: ([0.40, 0.00, 0.00, 0.10, 0, 0, 0], [0.00, 0.00, 0.00, 0.60, 0, 0, 0]),  # head 0 alone would say 'red'
        0: ([0.10, 0.00, 0.00, 0.05, 0.50, 0.1, 0], [0.10, 0.00, 0.00, 0.00, 0.60, 0, 0.1]),
    }
    weights = torch.zeros(1, 2, 24, 8)
    for p, label in enumerate(grid.flatten().tolist()):
        for head in range(2):
            weights[0, head, p, 1:] = torch.tensor(per_patch[label][head])
            weights[0, head, p, 0] = 1 - weights[0, head, p, 1:].sum()
    token_map = sf.TokenMap(candidates, words)

    # on the patch grid itself: the head-averaged weights summed per word, channel 0 = EOS and padding
    scores = sf.accumulate_word_scores(weights, token_map, (4, 6))
    mean = weights.mean(1)[0]  # (24, 8)
    expected = torch.stack([mean[:, 5:].sum(-1), mean[:, 1], mean[:, 2] + mean[:, 3], mean[:, 4]]).reshape(4, 4, 6)
    assert scores.shape == (1, 4, 4, 6) and torch.allclose(scores[0], expected, atol=1e-6)
    labels = sf.segmentation_from_scores(scores)[0]
    want = grid.clone()
    want[3, 5] = 1  # channel 0 never wins: the EOS patch goes to its strongest word ('red', 0.1 > 0.025, 0.025)
    assert torch.equal(labels, want)

    # on the 8x12 latent grid (upsampled 2x) with decisive patches (0.8 on the patch's word, split over
    # its tokens): every latent pixel takes its own patch's word
    decisive = torch.zeros(1, 2, 24, 8)
    decisive[..., 0] = 0.2
    for p, label in enumerate(want.flatten().tolist()):
        tokens = (words == label).nonzero().flatten()
        decisive[0, :, p, tokens] = 0.8 / len(tokens)
    up = sf.segmentation_from_scores(sf.accumulate_word_scores(decisive, token_map, (8, 12)))[0]
    assert up.shape == (8, 12) and torch.equal(up, want.repeat_interleave(2, 0).repeat_interleave(2, 1))
    # with no word at all, channel 0 is the only channel and wins
    only_specials = sf.TokenMap(candidates, torch.zeros(8, dtype=torch.long))
    assert torch.equal(sf.segmentation_from_scores(sf.accumulate_word_scores(weights, only_specials, (4, 6)))[0],
                       torch.zeros(4, 6, dtype=torch.long))


def test_segmentation_map(nodes_sf, sf, tiny_sd15, tiny_clip, artifacts):
    """The node on a tiny model: words in prompt order, one mask per word per image, and the map's
    colours and legend agree with the masks (mask k is the pixels coloured as word k)."""
    latent = {"samples": torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))}
    image, masks, words = run_node(nodes_sf.SegmentationMap, model=tiny_sd15, clip=tiny_clip, text="a red circle and a blue square",
                                   samples=latent, start_percent=0.2, end_percent=0.8, probes=3, seed=1)
    words = words.split("\n")
    assert words == ["a", "red", "circle", "and", "a", "blue", "square"]
    assert image.shape[0] == 2 and image.shape[2] == 96 * 4 and image.shape[1] > 64 * 4 and image.shape[3] == 3
    assert masks.shape == (2 * len(words), 64, 96)
    per_word = masks.view(2, len(words), 64, 96)
    assert set(per_word.unique().tolist()) <= {0.0, 1.0} and per_word.sum(1).max() == 1
    labels = (per_word * torch.arange(1, len(words) + 1).view(1, -1, 1, 1)).sum(1).long()  # 0 where no word's mask
    colours = torch.tensor([(90, 90, 90)] + sf.PALETTE[:len(words)], dtype=torch.float32) / 255
    for b in range(2):
        assert torch.allclose(image[b, :256:4, ::4], colours[labels[b]], atol=1e-6)  # the map, enlarged 4x
    assert len(labels.unique()) > 1  # the tiny model's attention does pick more than one word
    # by default only content words are given patches ("a" and "and" name nothing); 'prompt words' is every word
    assert set(labels.unique().tolist()) <= {0, 2, 3, 6, 7}
    _, every_masks, _ = run_node(nodes_sf.SegmentationMap, model=tiny_sd15, clip=tiny_clip, text="a red circle and a blue square",
                                 samples=latent, start_percent=0.2, end_percent=0.8, probes=3, seed=1, candidates="prompt words")
    every = every_masks.view(2, len(words), 64, 96)
    assert every[:, [0, 3, 4]].sum() > 0  # on this tiny model function words do win patches when allowed
    assert torch.equal(every.sum(1), per_word.sum(1))  # every patch still gets exactly one word
    from PIL import Image
    Image.fromarray((image[0].numpy() * 255).astype("uint8")).save(artifacts / "segmentation_map.png")


# ---------------------------------------------------------------------------------------------
# The workflows, through ComfyUI's own executor in this process

WORKFLOW_STEPS = 6  # the shipped graphs with fewer steps and images (tests/test_server.py runs them as shipped)


def load_workflow(name: str) -> dict:
    import json

    import comfy_harness

    prompt = json.loads((comfy_harness.PACK_DIR / "workflows" / "src" / f"{name}.api.json").read_text())
    for node in prompt.values():
        if node["class_type"] in ("KSampler", "BasicScheduler"):
            node["inputs"]["steps"] = WORKFLOW_STEPS
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"]["batch_size"] = min(node["inputs"]["batch_size"], 2)
    return prompt


def saved_pictures(outputs: dict, node_id: str) -> list:
    import os

    import folder_paths
    import numpy
    from PIL import Image

    return [numpy.asarray(Image.open(os.path.join(folder_paths.get_directory_by_type(i["type"]), i["subfolder"], i["filename"])))
            for i in outputs[node_id]["images"]]


def as_saved(images: torch.Tensor) -> list:
    """What SaveImage writes for an IMAGE batch."""
    import numpy

    return [numpy.clip(255.0 * i.cpu().numpy(), 0, 255).astype(numpy.uint8) for i in images]


def same_pictures(got: list, want: list) -> bool:
    import numpy

    return len(got) == len(want) and all(g.shape == w.shape and numpy.abs(g.astype(int) - w.astype(int)).max() <= 1
                                         for g, w in zip(got, want))


@pytest.fixture(scope="module")
def node_level(comfy_nodes, pack_module, nodes_sf):
    """The workflows' results computed by calling the same nodes directly (shared between tests)."""
    loader = pack_module("nodes.shapes_world_loader")
    bundle = loader.load("trained", 0)
    model, vae = bundle["model"], bundle["vae"]
    results = {}

    def sample(model, clip, text, batch, seed, cfg=7.5):
        positive, negative = tiny_models.encode(clip, text), tiny_models.encode(clip, "")
        (out,) = comfy_nodes.common_ksampler(model, seed, WORKFLOW_STEPS, cfg, "euler", "normal", positive, negative,
                                             {"samples": torch.zeros(batch, 4, 16, 16)}, denoise=1.0)
        return out

    def get(key):
        with torch.inference_mode():  # as ComfyUI's executor runs nodes
            compute(key)
        return results[key]

    def compute(key):
        if key not in results:
            if key in ("segfree", "segfree_vs_cfg", "cfg_batch"):
                key = "segfree_vs_cfg" if key == "cfg_batch" else key
                text, batch, seed = (("a red circle to the left of a blue square", 1, 1) if key == "segfree"
                                     else ("a green triangle above a yellow circle", 2, 3))
                (patched, clip) = run_node(nodes_sf.SegmentationFreeGuidance, model=model, clip=bundle["clip"], start_percent=0.4,
                                           **SETTINGS)
                results[key] = vae.decode(sample(patched, clip, text, batch, seed)["samples"])
                if key == "segfree_vs_cfg":
                    results["cfg_batch"] = vae.decode(sample(model, clip, text, batch, seed)["samples"])
            elif key == "segmentation_map":
                text = "a red circle to the left of a blue square"
                latent = sample(model, bundle["clip"], text, 1, 1)
                image_map, masks, _ = run_node(nodes_sf.SegmentationMap, model=model, clip=bundle["clip"], text=text,
                                               samples=latent, start_percent=0.3, end_percent=0.8, probes=4, seed=0)
                results[key] = (vae.decode(latent["samples"]), image_map, masks)

    return get


@pytest.mark.parametrize("name", ["segfree_ksampler", "segfree_guider", "segfree_vs_cfg", "segfree_segmentation_map"])
def test_workflow_runs_in_executor(run_prompt, node_level, name):
    """Each shipped graph runs in ComfyUI's executor and saves what its nodes give when called directly
    (up to 1/255 of PNG rounding): the MODEL patch and the GUIDER give the same picture; the comparison
    shows CFG on top and SFG below; the map and its masks are the node's."""
    import numpy

    prompt = load_workflow(name)
    outputs = run_prompt(prompt)
    savers = {v["class_type"] + ":" + prompt[v["inputs"]["images"][0]]["class_type"]: k for k, v in prompt.items()
              if v["class_type"] == "SaveImage"}
    if name in ("segfree_ksampler", "segfree_guider"):
        (saved,) = savers.values()
        assert same_pictures(saved_pictures(outputs, saved), as_saved(node_level("segfree")))
    elif name == "segfree_vs_cfg":
        stitched = saved_pictures(outputs, savers["SaveImage:ImageStitch"])
        assert len(stitched) == 2  # two seeds, each CFG on top and SFG below, 8 px apart
        top, bottom = [p[:128] for p in stitched], [p[-128:] for p in stitched]
        assert same_pictures(top, as_saved(node_level("cfg_batch"))) and same_pictures(bottom, as_saved(node_level("segfree_vs_cfg")))
        assert all(numpy.abs(t.astype(int) - b.astype(int)).mean() > 1 for t, b in zip(top, bottom))
    else:
        image, image_map, masks = node_level("segmentation_map")
        assert same_pictures(saved_pictures(outputs, savers["SaveImage:VAEDecode"]), as_saved(image))
        assert same_pictures(saved_pictures(outputs, savers["SaveImage:MC_SegmentationMap"]), as_saved(image_map))
        mask_pictures = saved_pictures(outputs, savers["SaveImage:MaskToImage"])
        assert same_pictures(mask_pictures, as_saved(masks[..., None].expand(-1, -1, -1, 3)))
        previews = [i for out in outputs.values() for i in out.get("images", []) if i["type"] == "temp"]
        assert len(previews) == 1  # the map shows on its node too
