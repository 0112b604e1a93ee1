"""Segmentation-free guidance: the attention edit, the switch, the combine, and the node paths."""
from __future__ import annotations

import hashlib
import math

import pytest
import torch

import tiny_models


@pytest.fixture(scope="module")
def sf(pack_module):
    return pack_module("nodes.algorithms.segfree")


@pytest.fixture(scope="module")
def glue(pack_module):
    return pack_module("nodes.glue")


@pytest.fixture(scope="module")
def nodes_sf(pack_module):
    return pack_module("nodes.segfree")


def model_fingerprint(model_patcher) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model_patcher.model.diffusion_model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    h.update(repr(sorted(model_patcher.model_options.get("transformer_options", {}).keys())).encode())
    h.update(repr(sorted(k for k in model_patcher.model_options)).encode())
    return h.hexdigest()


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


def test_after_switch_the_combine_is_eq_11(comfy_nodes, glue, tiny_sd15, prompts):
    """From the first step on, the result no longer depends on the user's cfg nor negative;
    with a = -1 the edit is the identity, ε̄ = ε, and eq. 11 gives plain ε: the cond-only result."""
    settings = glue.SegfreeSettings(segfree_scale=10.0, segfree_cfg=2.0, start_percent=0.0)
    patched = glue.apply_segfree_guidance(tiny_sd15, settings, "test")
    a = ksample(comfy_nodes, patched, prompts["positive"], prompts["negative"], cfg=4.0)
    b = ksample(comfy_nodes, patched, prompts["positive"], prompts["empty"], cfg=9.0)
    assert torch.allclose(a, b, atol=1e-4)
    cfg = ksample(comfy_nodes, tiny_sd15, prompts["positive"], prompts["negative"], cfg=3.0)
    assert (a - cfg).abs().max() > 1e-2  # it is not CFG

    identity = glue.apply_segfree_guidance(tiny_sd15, glue.SegfreeSettings(segfree_scale=-1.0, segfree_cfg=5.0, start_percent=0.0), "test")
    cond_only = ksample(comfy_nodes, tiny_sd15, prompts["positive"], prompts["negative"], cfg=1.0)
    assert torch.allclose(ksample(comfy_nodes, identity, prompts["positive"], prompts["negative"], cfg=7.0), cond_only, rtol=1e-4, atol=1e-3)


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


@pytest.mark.parametrize("case", ["batch2", "cfg1", "odd_size", "long_prompt", "plain_clip", "per_head_specials"])
def test_variants_run_and_differ_from_cfg(comfy_nodes, nodes_sf, glue, tiny_sd15, tiny_clip, prompts, case):
    settings = dict(SETTINGS)
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
    elif case == "per_head_specials":
        settings.update(attention_heads="per head", candidates="prompt words + end/padding")
    (patched, _) = run_node(nodes_sf.SegmentationFreeGuidance, model=tiny_sd15, start_percent=0.0, **settings)
    out = ksample(comfy_nodes, patched, positive, prompts["negative"], cfg=cfg, latent=latent)
    ref = ksample(comfy_nodes, tiny_sd15, positive, prompts["negative"], cfg=cfg, latent=latent)
    assert out.shape == latent["samples"].shape and torch.isfinite(out).all()
    assert (out - ref).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights(comfy_nodes, glue, prompts, dtype):
    model = tiny_models.tiny_model("sd15", seed=0, dtype=dtype)
    patched = glue.apply_segfree_guidance(model, glue.SegfreeSettings(start_percent=0.0), "test")
    out = ksample(comfy_nodes, patched, prompts["positive"], prompts["negative"], steps=2)
    assert torch.isfinite(out).all()


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


def test_dit_family_is_refused_by_name(nodes_sf, glue):
    flux = tiny_models.tiny_flux()
    with pytest.raises(glue.NodeInputError, match="MC_SegmentationFreeGuidance: input 'model': Flux models use joint"):
        run_node(nodes_sf.SegmentationFreeGuidance, model=flux, start_percent=0.4, **SETTINGS)


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


def test_segmentation_map(nodes_sf, tiny_sd15, tiny_clip, artifacts):
    latent = {"samples": torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))}
    image, masks, words = run_node(nodes_sf.SegmentationMap, model=tiny_sd15, clip=tiny_clip, text="a red circle and a blue square",
                                   samples=latent, start_percent=0.2, end_percent=0.8, probes=3, seed=1)
    words = words.split("\n")
    assert words == ["a", "red", "circle", "and", "a", "blue", "square"]
    assert image.shape[0] == 2 and image.shape[2] == 96 * 4 and image.shape[1] > 64 * 4 and image.shape[3] == 3
    assert masks.shape == (2 * len(words), 64, 96)
    per_image = masks.view(2, len(words), 64, 96).sum(1)
    assert torch.equal(per_image, torch.ones_like(per_image))  # every pixel belongs to exactly one word
    from PIL import Image
    Image.fromarray((image[0].numpy() * 255).astype("uint8")).save(artifacts / "segmentation_map.png")


# ---------------------------------------------------------------------------------------------
# The workflows, through ComfyUI's own executor in this process

@pytest.mark.parametrize("name", ["segfree_ksampler", "segfree_guider", "segfree_vs_cfg", "segfree_segmentation_map"])
def test_workflow_runs_in_executor(run_prompt, name):
    import json

    import folder_paths
    import numpy
    from PIL import Image

    import comfy_harness

    prompt = json.loads((comfy_harness.PACK_DIR / "workflows" / "src" / f"{name}.api.json").read_text())
    outputs = run_prompt(prompt)
    mask_savers = {k for k, v in prompt.items() if v["class_type"] == "SaveImage" and prompt[v["inputs"]["images"][0]]["class_type"] == "MaskToImage"}
    saved = [img for node, out in outputs.items() if node not in mask_savers for img in out.get("images", [])]
    assert saved, outputs
    pictures = [numpy.asarray(Image.open(pathlib_join(folder_paths.get_directory_by_type(i["type"]), i["subfolder"], i["filename"])))
                for i in saved if i["type"] == "output"]
    previews = [i for i in saved if i["type"] == "temp"]
    assert len(previews) == (1 if name == "segfree_segmentation_map" else 0)  # the map shows on its node
    assert all(p.std() > 0 for p in pictures)
    if name == "segfree_vs_cfg":
        assert len(pictures) == 4  # four seeds, each CFG on top and SFG below, 8 px apart
        for stitched in pictures:
            top, bottom = stitched[: stitched.shape[0] // 2 - 4], stitched[stitched.shape[0] // 2 + 4:]
            assert top.shape == bottom.shape and numpy.abs(top.astype(float) - bottom.astype(float)).mean() > 0


def pathlib_join(*parts):
    import os

    return os.path.join(*parts)
