"""Semantic diffusion guidance: guidance functions (eqs. 6-10), the sampling hook in each mode, the
noise-aware encoder (files, errors, training), on tiny models through ComfyUI's own samplers."""
from __future__ import annotations

import hashlib

import pytest
import torch

import sdg_fixtures
import tiny_models


@pytest.fixture(scope="module")
def algo(pack_module):
    return pack_module("nodes.algorithms.sdg")


@pytest.fixture(scope="module")
def glue(pack_module):
    return pack_module("nodes.glue")


@pytest.fixture(scope="module")
def nodes_sdg(pack_module):
    return pack_module("nodes.sdg")


@pytest.fixture(scope="module")
def clip_models(pack_module):
    return pack_module("nodes.clip_models")


@pytest.fixture(scope="module")
def mc_clip(clip_models):
    return sdg_fixtures.tiny_mc_clip(clip_models)


@pytest.fixture(scope="module")
def encoder(glue, algo, clip_models, mc_clip, tiny_sd15):
    return sdg_fixtures.tiny_encoder(glue, algo, clip_models, mc_clip, tiny_sd15)


@pytest.fixture(scope="module")
def conds(tiny_clip):
    return {"empty": tiny_models.encode(tiny_clip, ""), "prompt": tiny_models.encode(tiny_clip, "a dog"),
            "negative": tiny_models.encode(tiny_clip, "blurry")}


def ksample(comfy_nodes, model, positive, negative, cfg=1.0, steps=3, seed=7, batch=1, start_step=None, last_step=None):
    latent = {"samples": torch.zeros(batch, 4, 8, 8)}
    (out,) = comfy_nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", positive, negative, latent,
                                         start_step=start_step, last_step=last_step, force_full_denoise=last_step is None)
    return out["samples"]


def fingerprint(*modules) -> str:
    h = hashlib.sha256()
    for module in modules:
        for name, p in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def guidance_of(nodes_sdg, mc_clip, kind: str, scale: float = 50.0, refs: torch.Tensor | None = None):
    refs = sdg_fixtures.reference_images(1) if refs is None else refs
    if kind == "text":
        return nodes_sdg.TextGuidance.execute(mc_clip, "a red circle", scale).result[0]
    if kind in ("content", "structure"):
        return nodes_sdg.ImageContentGuidance.execute(mc_clip, refs, scale, kind == "structure", "auto").result[0]
    return nodes_sdg.ImageStyleGuidance.execute(mc_clip, refs, scale, "auto").result[0]


# ---------------------------------------------------------------------------------------------
# The guidance functions (plain torch)

def test_guidance_functions_match_the_equations(algo):
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 6, 2, 2, generator=g)]
    refs = [torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 6, 2, 2, generator=g)]
    # eq. 8: -sum_j ||f - f'||^2 / (C H W)
    want = -sum(((m - r) ** 2).sum(dim=(1, 2, 3)) / m[0].numel() for m, r in zip(maps, refs))
    assert torch.allclose(algo.structure_guidance(maps, refs), want)
    # eq. 9 with a per-sample Gram: sample 0's value does not change when the other samples do
    grams = [algo.gram(r) for r in refs]
    value = algo.style_guidance(maps, grams)
    other = [torch.cat([m[:1], torch.randn_like(m[1:])]) for m in maps]
    assert torch.allclose(algo.style_guidance(other, grams)[0], value[0])
    hand = -sum(((m[0].reshape(m.shape[1], -1) @ m[0].reshape(m.shape[1], -1).T / m[0].numel() - gr[0]) ** 2).sum()
                for m, gr in zip(maps, grams))
    assert torch.allclose(value[0], hand)
    assert torch.allclose(algo.style_guidance(refs, grams), torch.zeros(3), atol=1e-6)
    # eqs. 6/7: cosines; eq. 10: weighted sum
    a, b = torch.randn(3, 8, generator=g), torch.randn(1, 8, generator=g)
    cos = torch.nn.functional.cosine_similarity(a, b.expand(3, -1))
    assert torch.allclose(algo.text_guidance(a, b), cos, atol=1e-6)
    assert torch.allclose(algo.combine([(2.0, cos), (-1.0, value)]), 2 * cos - value)


def test_reference_batches_and_layers(algo):
    ref = torch.arange(2.0).reshape(2, 1)
    assert algo.fit_batch(ref, 4).flatten().tolist() == [0, 1, 0, 1]
    assert algo.fit_batch(ref[:1], 3).flatten().tolist() == [0, 0, 0]
    assert algo.fit_batch(ref, 3) is None
    assert algo.parse_layers("auto", 5, [2, 3]) == [2, 3]
    assert algo.parse_layers("4, 1", 5, []) == [1, 4]
    with pytest.raises(ValueError, match="layer 7 does not exist"):
        algo.parse_layers("7", 5, [])


# ---------------------------------------------------------------------------------------------
# Sampling: off means untouched, bit for bit

def test_scale_zero_and_outside_range_are_bit_identical(comfy_nodes, nodes_sdg, mc_clip, encoder, tiny_sd15, tiny_vae, conds):
    plain = ksample(comfy_nodes, tiny_sd15, conds["prompt"], conds["negative"], cfg=4.0)
    zero = guidance_of(nodes_sdg, mc_clip, "text", scale=0.0)
    (patched,) = nodes_sdg.ApplySemanticGuidance.execute(tiny_sd15, zero, "auto", 0.0, 1.0, 1, 0, vae=tiny_vae,
                                                         noise_aware_encoder=encoder).result
    assert torch.equal(ksample(comfy_nodes, patched, conds["prompt"], conds["negative"], cfg=4.0), plain)
    text = guidance_of(nodes_sdg, mc_clip, "text")
    for mode in ("noise-aware", "decoded (fast)"):
        (never,) = nodes_sdg.ApplySemanticGuidance.execute(tiny_sd15, text, mode, 1.0, 1.0, 1, 0, vae=tiny_vae,
                                                           noise_aware_encoder=encoder).result
        assert torch.equal(ksample(comfy_nodes, never, conds["prompt"], conds["negative"], cfg=4.0), plain)
    # from the middle on: the steps before are the unpatched model's
    (late,) = nodes_sdg.ApplySemanticGuidance.execute(tiny_sd15, text, "noise-aware", 0.5, 1.0, 1, 0,
                                                      noise_aware_encoder=encoder).result
    early_plain = ksample(comfy_nodes, tiny_sd15, conds["prompt"], conds["negative"], cfg=4.0, steps=6, start_step=0, last_step=2)
    early_late = ksample(comfy_nodes, late, conds["prompt"], conds["negative"], cfg=4.0, steps=6, start_step=0, last_step=2)
    assert torch.equal(early_plain, early_late)
    full = ksample(comfy_nodes, late, conds["prompt"], conds["negative"], cfg=4.0, steps=6)
    assert (full - ksample(comfy_nodes, tiny_sd15, conds["prompt"], conds["negative"], cfg=4.0, steps=6)).abs().max() > 1e-4


def test_every_n_steps_guides_one_step_in_n(comfy_nodes, nodes_sdg, glue, mc_clip, encoder, tiny_sd15, conds):
    text = guidance_of(nodes_sdg, mc_clip, "text")
    (every,) = nodes_sdg.ApplySemanticGuidance.execute(tiny_sd15, text, "noise-aware", 0.0, 1.0, 1, 0, noise_aware_encoder=encoder).result
    (third,) = nodes_sdg.ApplySemanticGuidance.execute(tiny_sd15, text, "noise-aware", 0.0, 1.0, 3, 0, noise_aware_encoder=encoder).result
    ksample(comfy_nodes, every, conds["empty"], conds["empty"], steps=6)
    ksample(comfy_nodes, third, conds["empty"], conds["empty"], steps=6)
    assert glue.guidance_hook(every).calls == 6 and glue.guidance_hook(third).calls == 2


# ---------------------------------------------------------------------------------------------
# One guidance step raises the guidance function, for every kind and mode

def at_first_step(comfy_nodes, model, positive, negative, check, batch=1):
    """Run `check(post-CFG arguments)` inside the first model evaluation of a sampling run (where
    ComfyUI's sampling state is set up), returning what it returns."""
    seen = []

    def recorder(args):
        if not seen:
            seen.append(check(dict(args)))
        return args["denoised"]

    recording = model.clone()
    recording.set_model_sampler_post_cfg_function(recorder)
    ksample(comfy_nodes, recording, positive, negative, cfg=1.0, steps=3, batch=batch)
    return seen[0]


def guidance_value(glue, hook, args, mode, x):
    """F as the hook sees it: of the noisy latent (noise-aware), of the decoded clean prediction
    recomputed through the UNet (exact), of the decoded clean prediction itself (fast)."""
    import comfy.samplers

    model, sigma = args["model"], args["sigma"]
    with torch.no_grad():
        if mode == "noise-aware":
            return hook._value_noise_aware(model, x, sigma, hook.step_seed(sigma))
        if mode == "decoded (exact)":
            x = comfy.samplers.calc_cond_batch(model, [args["cond"]], x, sigma, args["model_options"])[0]
        return hook._value_from_images(hook._decode(model, x))


@pytest.mark.parametrize("kind", ["text", "content", "structure", "style"])
@pytest.mark.parametrize("mode", ["noise-aware", "decoded (exact)", "decoded (fast)"])
def test_one_guidance_step_raises_the_guidance_function(comfy_nodes, nodes_sdg, glue, mc_clip, encoder, tiny_sd15,
                                                         tiny_vae, conds, kind, mode):
    guidance = guidance_of(nodes_sdg, mc_clip, kind, scale=1.0)
    (patched,) = nodes_sdg.ApplySemanticGuidance.execute(tiny_sd15, guidance, mode, 0.0, 1.0, 1, 3, vae=tiny_vae,
                                                         noise_aware_encoder=encoder).result
    hook = glue.guidance_hook(patched)

    def check(args):
        shifted = hook(args)
        delta = shifted - args["denoised"]
        start = args["denoised"] if mode == "decoded (fast)" else args["input"]
        step = 1e-2 * delta / delta.abs().max().clamp_min(1e-30)
        return delta.abs().max(), guidance_value(glue, hook, args, mode, start), guidance_value(glue, hook, args, mode, start + step)

    change, before, after = at_first_step(comfy_nodes, tiny_sd15, conds["empty"], conds["empty"], check)
    assert change > 0, "the hook changed nothing"
    assert (after > before).all(), (kind, mode, before, after)
