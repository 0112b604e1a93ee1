"""Semantic diffusion guidance: guidance functions (eqs. 6-10), the sampling hook in each mode, the
noise-aware encoder (files, errors, training), on tiny models through ComfyUI's own samplers."""
from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch

import sdg_fixtures
import tiny_models


@pytest.fixture(scope="module")
def algo(pack_module):
    return pack_module("nodes.algorithms.sdg")


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
    return tiny_models.fingerprint(*modules)


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
    ksample(comfy_nodes, recording, positive, negative, cfg=1.0, steps=1, batch=batch)
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


@pytest.fixture(scope="module")
def dit_models():
    return {"sd3": tiny_models.tiny_sd3(seed=0), "flux": tiny_models.tiny_flux(seed=0, guidance_embed=True)}


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("mode", ["noise-aware", "decoded (fast)", "decoded (exact)"])
def test_guidance_on_16_channel_joint_attention_models(comfy_nodes, nodes_sdg, glue, algo, clip_models, mc_clip, dit_models,
                                                       family, mode):
    """SD3 and Flux (16-channel latents, their own latent formats and samplings): the encoder's stem
    takes 16 channels, a 16-channel VAE decodes, and one step raises F as on UNets."""
    model = dit_models[family]
    encoder16 = sdg_fixtures.tiny_encoder(glue, algo, clip_models, mc_clip, model)
    assert encoder16.record.latent_channels == 16
    guidance = guidance_of(nodes_sdg, mc_clip, "content", scale=1.0)
    (patched,) = nodes_sdg.ApplySemanticGuidance.execute(model, guidance, mode, 0.0, 1.0, 1, 3, vae=tiny_models.tiny_vae16(seed=3),
                                                         noise_aware_encoder=encoder16).result
    hook = glue.guidance_hook(patched)
    positive = tiny_models.dit_conditioning(family, 1)
    if family == "flux":
        positive[0][1]["guidance"] = 3.5
    seen = []

    def check(args):
        if not seen:
            shifted = hook(args)
            delta = shifted - args["denoised"]
            start = args["denoised"] if mode == "decoded (fast)" else args["input"]
            step = 1e-2 * delta / delta.abs().max().clamp_min(1e-30)
            seen.append((delta.abs().max(), guidance_value(glue, hook, args, mode, start),
                         guidance_value(glue, hook, args, mode, start + step)))
        return args["denoised"]

    recording = model.clone()
    recording.set_model_sampler_post_cfg_function(check)

    def sample():
        comfy_nodes.common_ksampler(recording, 7, 1, 1.0, "euler", "simple", positive, positive,
                                    {"samples": torch.zeros(1, 16, 8, 8)})

    if family == "flux" and mode == "decoded (exact)":
        # ComfyUI's Flux blocks write into their activations in place: no gradient through the model
        with pytest.raises(glue.NodeInputError, match="MC_ApplySemanticGuidance: input 'mode'.*Flux model.*'decoded \\(fast\\)'"):
            sample()
        return
    sample()
    change, before, after = seen[0]
    assert change > 0 and (after > before).all(), (family, mode, before, after)


# ---------------------------------------------------------------------------------------------
# Batches, precision, inference mode, composition

def test_batch_each_sample_its_own_gradient_and_reference(comfy_nodes, nodes_sdg, glue, mc_clip, tiny_sd15, tiny_vae, conds):
    """Two samples with two style references: each sample's gradient is the one it gets alone with
    its own reference (per-sample Gram matrices; nothing mixes across the batch)."""
    refs = sdg_fixtures.reference_images(2, seed=11)
    pair = guidance_of(nodes_sdg, mc_clip, "style", scale=1.0, refs=refs)
    (both,) = nodes_sdg.ApplySemanticGuidance.execute(tiny_sd15, pair, "decoded (fast)", 0.0, 1.0, 1, 0, vae=tiny_vae).result
    hook_both = glue.guidance_hook(both)
    alone = []
    for i in range(2):
        single = guidance_of(nodes_sdg, mc_clip, "style", scale=1.0, refs=refs[i:i + 1])
        (patched,) = nodes_sdg.ApplySemanticGuidance.execute(tiny_sd15, single, "decoded (fast)", 0.0, 1.0, 1, 0, vae=tiny_vae).result
        alone.append(glue.guidance_hook(patched))

    def check(args):
        with glue.gradients_enabled():
            grad = hook_both.gradient(args)
            singles = [h.gradient({**args, "denoised": args["denoised"][i:i + 1], "input": args["input"][i:i + 1],
                                   "sigma": args["sigma"][i:i + 1]}) for i, h in enumerate(alone)]
        return grad, singles

    grad, singles = at_first_step(comfy_nodes, tiny_sd15, conds["empty"], conds["empty"], check, batch=2)
    assert grad.abs().max() > 0
    for i in range(2):
        assert torch.allclose(grad[i:i + 1], singles[i], rtol=1e-3, atol=1e-6 * float(grad.abs().max()))
    assert not torch.allclose(singles[0], singles[1])


def test_runs_under_inference_mode_with_cfg_and_batch(comfy_nodes, nodes_sdg, clip_models, encoder, tiny_sd15, tiny_vae, conds):
    """As ComfyUI's executor runs nodes: inside torch.inference_mode(), batch 2, cfg > 1 and cfg 1,
    with an MC_CLIP built there too (its weights are inference tensors, as a loader node's are)."""
    with torch.inference_mode():
        mc_clip = sdg_fixtures.tiny_mc_clip(clip_models)
        assert next(mc_clip.model.parameters()).is_inference()
        text = guidance_of(nodes_sdg, mc_clip, "text")
        content = guidance_of(nodes_sdg, mc_clip, "structure", refs=sdg_fixtures.reference_images(2))
        (both,) = nodes_sdg.CombineGuidance.execute(text, 1.0, content, 0.5).result
        assert [t.kind for t in both.terms] == ["text", "structure"] and both.terms[1].scale == 25.0
        refs = {cfg: ksample(comfy_nodes, tiny_sd15, conds["prompt"], conds["negative"], cfg=cfg, steps=2, batch=2)
                for cfg in (1.0, 4.0)}
        for mode in ("noise-aware", "decoded (fast)", "decoded (exact)"):
            (patched,) = nodes_sdg.ApplySemanticGuidance.execute(tiny_sd15, both, mode, 0.0, 1.0, 1, 0, vae=tiny_vae,
                                                                 noise_aware_encoder=encoder).result
            for cfg in (1.0, 4.0):
                out = ksample(comfy_nodes, patched, conds["prompt"], conds["negative"], cfg=cfg, steps=2, batch=2)
                assert torch.isfinite(out).all() and (out - refs[cfg]).abs().max() > 1e-4, (mode, cfg)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(comfy_nodes, nodes_sdg, glue, algo, clip_models, mc_clip, tiny_vae, conds, dtype):
    model = tiny_models.tiny_model("sd15", seed=0, dtype=dtype)
    encoder = sdg_fixtures.tiny_encoder(glue, algo, clip_models, mc_clip, model)
    text = guidance_of(nodes_sdg, mc_clip, "text")
    for mode in ("noise-aware", "decoded (fast)"):
        (patched,) = nodes_sdg.ApplySemanticGuidance.execute(model, text, mode, 0.0, 1.0, 1, 0, vae=tiny_vae,
                                                             noise_aware_encoder=encoder).result
        out = ksample(comfy_nodes, patched, conds["prompt"], conds["negative"], cfg=3.0, steps=2)
        assert torch.isfinite(out).all() and (out - ksample(comfy_nodes, model, conds["prompt"], conds["negative"], cfg=3.0, steps=2)).abs().max() > 0
        assert glue.guidance_hook(patched).calls == 2
    assert next(encoder.encoder.parameters()).dtype == torch.float32


def test_composes_with_segmentation_free_guidance(comfy_nodes, nodes_sdg, pack_module, glue, mc_clip, encoder, tiny_sd15, tiny_clip):
    nodes_sf = pack_module("nodes.segfree")
    (sfg, clip) = nodes_sf.SegmentationFreeGuidance.execute(model=tiny_sd15, clip=tiny_clip, segfree_scale=10.0, segfree_cfg=2.0,
                                                            start_percent=0.0, attention_heads="mean over heads",
                                                            candidates="prompt words").result
    positive, negative = tiny_models.encode(clip, "a dog and a cat"), tiny_models.encode(clip, "blurry")
    (both,) = nodes_sdg.ApplySemanticGuidance.execute(sfg, guidance_of(nodes_sdg, mc_clip, "text"), "noise-aware", 0.0, 1.0, 1, 0,
                                                      noise_aware_encoder=encoder).result
    sfg_only = ksample(comfy_nodes, sfg, positive, negative, cfg=5.0)
    out = ksample(comfy_nodes, both, positive, negative, cfg=5.0)
    assert torch.isfinite(out).all() and (out - sfg_only).abs().max() > 1e-4
    assert glue.guidance_hook(both).calls == 3
    assert "sampler_calc_cond_batch_function" in both.model_options  # SFG's patch still there


def test_user_model_vae_and_clip_unchanged(comfy_nodes, nodes_sdg, mc_clip, encoder, tiny_sd15, tiny_vae, conds):
    before = (fingerprint(tiny_sd15.model.diffusion_model, tiny_vae.first_stage_model, mc_clip.model, encoder.encoder),
              sorted(tiny_sd15.model_options), dict(tiny_sd15.model_options.get("transformer_options", {})))
    guidance = guidance_of(nodes_sdg, mc_clip, "style")
    for mode in ("noise-aware", "decoded (exact)"):
        (patched,) = nodes_sdg.ApplySemanticGuidance.execute(tiny_sd15, guidance, mode, 0.0, 1.0, 1, 0, vae=tiny_vae,
                                                             noise_aware_encoder=encoder).result
        assert patched is not tiny_sd15
        ksample(comfy_nodes, patched, conds["prompt"], conds["negative"], cfg=3.0, steps=2)
    after = (fingerprint(tiny_sd15.model.diffusion_model, tiny_vae.first_stage_model, mc_clip.model, encoder.encoder),
             sorted(tiny_sd15.model_options), dict(tiny_sd15.model_options.get("transformer_options", {})))
    assert after == before
    assert all(not p.requires_grad for p in mc_clip.model.parameters())


# ---------------------------------------------------------------------------------------------
# Clear errors

def test_bad_input_errors_name_node_and_input(comfy_nodes, nodes_sdg, glue, algo, clip_models, mc_clip, encoder, tiny_sd15,
                                              tiny_vae, conds):
    with pytest.raises(glue.NodeInputError, match="MC_TextGuidance: input 'text'"):
        nodes_sdg.TextGuidance.execute(mc_clip, "   ", 100.0)
    with pytest.raises(glue.NodeInputError, match="MC_ImageStyleGuidance: input 'layers'.*layer 9 does not exist"):
        nodes_sdg.ImageStyleGuidance.execute(mc_clip, sdg_fixtures.reference_images(1), 100.0, "1,9")
    # three references for a batch of two
    content = guidance_of(nodes_sdg, mc_clip, "content", refs=sdg_fixtures.reference_images(3))
    (patched,) = nodes_sdg.ApplySemanticGuidance.execute(tiny_sd15, content, "decoded (fast)", 0.0, 1.0, 1, 0, vae=tiny_vae).result
    with pytest.raises(glue.NodeInputError, match="MC_ImageContentGuidance: input 'image': 3 reference images fit no batch of 2"):
        ksample(comfy_nodes, patched, conds["prompt"], conds["negative"], batch=2)
    # an encoder trained for another channel count / latent format
    wrong = sdg_fixtures.tiny_encoder(glue, algo, clip_models, mc_clip, tiny_sd15, channels=16)
    text = guidance_of(nodes_sdg, mc_clip, "text")
    with pytest.raises(glue.NodeInputError, match="MC_ApplySemanticGuidance: input 'noise_aware_encoder'.*16-channel"):
        nodes_sdg.ApplySemanticGuidance.execute(tiny_sd15, text, "noise-aware", 0.0, 1.0, 1, 0, noise_aware_encoder=wrong)
    other = glue.NoiseAwareEncoderFile(encoder.encoder, algo.EncoderRecord(**{**encoder.record.__dict__, "latent_format": "SDXL",
                                                                                 "scale_factor": 0.13025}), "sdxl_encoder")
    with pytest.raises(glue.NodeInputError, match="MC_ApplySemanticGuidance: input 'noise_aware_encoder'.*SDXL latents"):
        nodes_sdg.ApplySemanticGuidance.execute(tiny_sd15, text, "noise-aware", 0.0, 1.0, 1, 0, noise_aware_encoder=other)
    with pytest.raises(glue.NodeInputError, match="MC_ApplySemanticGuidance: input 'noise_aware_encoder'"):
        nodes_sdg.ApplySemanticGuidance.execute(tiny_sd15, text, "noise-aware", 0.0, 1.0, 1, 0)
    with pytest.raises(glue.NodeInputError, match="MC_ApplySemanticGuidance: input 'vae'"):
        nodes_sdg.ApplySemanticGuidance.execute(tiny_sd15, text, "decoded (fast)", 0.0, 1.0, 1, 0)
    with pytest.raises(glue.NodeInputError, match="MC_ApplySemanticGuidance: input 'vae'"):
        nodes_sdg.ApplySemanticGuidance.execute(tiny_sd15, content, "noise-aware", 0.0, 1.0, 1, 0, noise_aware_encoder=encoder)
    assert "start_percent" in nodes_sdg.ApplySemanticGuidance.validate_inputs(start_percent=0.6, end_percent=0.2)


# ---------------------------------------------------------------------------------------------
# Noise-aware encoder: files, training

def test_encoder_starts_from_clip_and_handles_vit_towers(algo):
    """Zero-initialised FiLM: the modulated norms are the tower's own at every noise level; a ViT's
    LayerNorms are modulated the same way and its token grid gives maps."""
    import open_clip

    torch.manual_seed(0)
    vit = open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
                         text_cfg={"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}).visual
    encoder = algo.NoiseAwareEncoder(vit, latent_channels=4)
    assert sum(isinstance(m, algo.FiLMNorm) for m in encoder.modules()) == 2 * 2 + 2
    z = torch.randn(2, 4, 6, 6)
    a, maps = encoder(z, torch.tensor([0.1, 10.0]), [0, 1])
    b, _ = encoder(z, torch.tensor([5.0, 0.5]), [])
    assert torch.allclose(a, b, atol=1e-6)  # FiLM starts at the identity: σ does not matter yet
    assert [m.shape for m in maps] == [(2, 32, 4, 4)] * 2
    torch.nn.init.normal_(encoder.film[-1].weight, std=0.1)
    c, _ = encoder(z, torch.tensor([5.0, 0.5]), [])
    assert not torch.allclose(a, c, atol=1e-4)
    with pytest.raises(ValueError, match="reads 4-channel latents, got 16"):
        encoder(torch.randn(1, 16, 6, 6), torch.tensor([1.0]))


def test_alignment_term_adds_to_the_contrastive_loss_and_keeps_the_clean_space(algo):
    """Our alignment term (1 - cosine with the clean embedding, weighted) is added to the paper's
    loss exactly, and its gradient pulls the noisy embeddings towards the clean ones."""
    import copy

    import open_clip

    torch.manual_seed(0)
    vit = open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
                         text_cfg={"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}).visual
    clean = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    assert float(algo.alignment_loss(clean, clean)) == pytest.approx(0.0, abs=1e-6)
    assert float(algo.alignment_loss(-clean, clean)) == pytest.approx(2.0, abs=1e-6)
    a = torch.randn(6, 16)
    by_hand = sum(1 - float(a[i] @ clean[i]) / float(a[i].norm()) for i in range(6)) / 6
    assert float(algo.alignment_loss(a, clean)) == pytest.approx(by_hand, abs=1e-5)

    x, sigmas = torch.randn(6, 4, 8, 8), torch.tensor([0.1, 0.5, 1.0, 2.0, 5.0, 10.0])
    plain = algo.NoiseAwareEncoder(vit, 4)
    aligned = copy.deepcopy(plain)
    with torch.no_grad():
        embedding, _ = plain(x, sigmas)
    expected_extra = 10.0 * float(algo.alignment_loss(embedding, clean))
    loss_plain = algo.training_step(plain, algo.make_optimizer(plain), x, sigmas, clean)
    loss_aligned = algo.training_step(aligned, algo.make_optimizer(aligned), x, sigmas, clean, alignment_weight=10.0)
    assert loss_aligned == pytest.approx(loss_plain + expected_extra, rel=1e-5)

    pulled = copy.deepcopy(aligned)
    optimizer = algo.make_optimizer(pulled, lr=1e-3)
    before = 1 - float(algo.alignment_loss(pulled(x, sigmas)[0].detach(), clean))
    for _ in range(5):
        algo.training_step(pulled, optimizer, x, sigmas, clean, alignment_weight=1000.0)
    after = 1 - float(algo.alignment_loss(pulled(x, sigmas)[0].detach(), clean))
    assert after > before + 0.05, (before, after)


def test_encoder_file_round_trip(glue, algo, encoder, tmp_path):
    path = tmp_path / "enc.safetensors"
    glue.save_noise_aware_encoder(encoder.encoder, encoder.record, path, fp16=False)
    loaded = glue.load_noise_aware_encoder(path)
    assert loaded.record == encoder.record
    z, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 3.0])
    with torch.no_grad():
        assert torch.allclose(loaded.encoder(z, sigma)[0], encoder.encoder(z, sigma)[0], atol=1e-6)
    (tmp_path / "plain.safetensors").write_bytes(b"")
    import safetensors.torch

    safetensors.torch.save_file({"w": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a noise-aware encoder file"):
        glue.load_noise_aware_encoder(tmp_path / "plain.safetensors")


def test_train_node_writes_resumable_encoder_and_lowers_loss(comfy_nodes, nodes_sdg, glue, mc_clip, tiny_sd15, tiny_vae, tmp_path):
    import folder_paths
    from PIL import Image

    folder = tmp_path / "pictures"
    folder.mkdir()
    images = sdg_fixtures.reference_images(6, 64, seed=21)
    for i, img in enumerate(images):
        Image.fromarray((img.numpy() * 255).astype("uint8")).save(folder / f"{i}.png")
    name = "mc_test_sdg_encoder"
    with torch.inference_mode():
        encoder, curve, info = nodes_sdg.TrainNoiseAwareEncoder.execute(
            mc_clip, tiny_sd15, tiny_vae, str(folder), name, 12, 6, 64, 1e-4, 0, False,
            images=sdg_fixtures.reference_images(2, 64, seed=22)).result
    out = pathlib.Path(folder_paths.get_folder_paths(glue.ENCODER_FOLDER)[0])
    record = glue.read_encoder_record(out / f"{name}.safetensors")
    assert record.latent_channels == 4 and record.latent_format == "SD15" and "12 steps on 8 images" in info
    assert curve.shape[0] == 1 and curve.shape[-1] == 3 and (out / f"{name}_loss.png").exists()
    history = json.loads((out / f"{name}.json").read_text())["loss_history"]
    assert len(history) == 12 and all(math.isfinite(v) for _, v in history)
    assert sum(v for _, v in history[-4:]) / 4 < sum(v for _, v in history[:4]) / 4  # it learns
    # resumable: 4 more steps continue from step 12
    with torch.inference_mode():
        nodes_sdg.TrainNoiseAwareEncoder.execute(mc_clip, tiny_sd15, tiny_vae, str(folder), name, 16, 6, 64, 1e-4, 0, True)
    assert len(json.loads((out / f"{name}.json").read_text())["loss_history"]) == 16
    # the loader lists and reads it
    assert f"{name}.safetensors" in nodes_sdg.encoder_options()
    (loaded,) = nodes_sdg.NoiseAwareEncoderLoader.execute(f"{name}.safetensors").result
    assert loaded.record.latent_format == "SD15"
    with pytest.raises(glue.NodeInputError, match="MC_TrainNoiseAwareEncoder: input 'folder'"):
        nodes_sdg.TrainNoiseAwareEncoder.execute(mc_clip, tiny_sd15, tiny_vae, str(tmp_path / "nope"), name, 1, 2, 64, 1e-4, 0, False)


def test_one_text_per_sample(comfy_nodes, glue, mc_clip, encoder, tiny_sd15, conds):
    """A text embedding of B rows guides sample i by text i (what the report's per-caption runs use)."""
    with torch.no_grad():
        texts = mc_clip.encode_text(["a red circle", "a blue square"]).float()
    settings = glue.SemanticSettings(mode="noise-aware")

    def hook_for(embedding):
        guidance = glue.Guidance([glue.GuidanceTerm("text", 1.0, mc_clip, "test", text_embedding=embedding)])
        return glue.guidance_hook(glue.apply_semantic_guidance(tiny_sd15, guidance, settings, None, encoder, "test"))

    both, first, second = hook_for(texts), hook_for(texts[:1]), hook_for(texts[1:])

    def check(args):
        with glue.gradients_enabled():
            return both.gradient(args), first.gradient(args), second.gradient(args)

    grad, g1, g2 = at_first_step(comfy_nodes, tiny_sd15, conds["empty"], conds["empty"], check, batch=2)
    assert torch.allclose(grad[:1], g1[:1], atol=1e-6) and torch.allclose(grad[1:], g2[1:], atol=1e-6)
    assert not torch.allclose(g1[1:], g2[1:])


def test_comfy_clip_vision_gives_differentiable_token_maps(clip_models, tiny_clip, tmp_path):
    """MC_CLIPFromComfy's pair: feature maps of chosen ViT blocks on the patch grid, with gradients."""
    vision = tiny_models.tiny_clip_vision(tmp_path, layers=3, patch_size=8)
    (pair,) = clip_models.CLIPFromComfy.execute(vision, tiny_clip).result
    assert clip_models.feature_stages(pair) == 3
    images = sdg_fixtures.reference_images(2, 40).requires_grad_(True)
    embedding, maps = clip_models.image_features(pair, images, [0, 2])
    assert embedding.shape == (2, 768) and [m.shape for m in maps] == [(2, 64, 4, 4)] * 2
    (maps[1].pow(2).sum() + embedding.sum()).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
