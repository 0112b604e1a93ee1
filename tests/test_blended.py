"""Blended Latent Diffusion nodes on the tiny models: what the paper says must hold.

Run: python -m pytest tests/test_blended*.py -q
"""
from __future__ import annotations


import pytest
import torch

import tiny_models
from tiny_models import box_mask, fingerprint, smooth_image


@pytest.fixture(scope="module")
def algo(pack_module):
    return pack_module("nodes.algorithms.blended")


@pytest.fixture(scope="module")
def blended(pack_module):
    return pack_module("nodes.blended")


@pytest.fixture(scope="module")
def conds(tiny_clip):
    return tiny_models.encode(tiny_clip, "a red ball"), tiny_models.encode(tiny_clip, "")


def source_latent(seed=5, batch=1, h=8, w=8):
    return torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Progressive mask shrinking

def test_dilation_is_binary_dilation_with_square_of_ones(algo):
    import numpy as np
    import scipy.ndimage

    mask = (torch.rand(2, 1, 13, 11, generator=torch.Generator().manual_seed(0)) > 0.85).float()
    for k in (1, 3, 5, 7):
        expected = np.stack([scipy.ndimage.binary_dilation(m[0].numpy() > 0, structure=np.ones((k, k))) for m in mask])
        assert torch.equal(algo.dilate(mask, k)[:, 0], torch.from_numpy(expected).float()), k


def test_schedule_splits_steps_into_equal_parts(algo):
    schedule = algo.ShrinkSchedule()
    assert [schedule.kernel_of_step(i, 4) for i in range(4)] == [7, 5, 3, 1]
    counts = [sum(schedule.stage_of_step(i, 50) == s for i in range(50)) for s in range(4)]
    assert counts == [13, 12, 13, 12] and sum(counts) == 50
    assert [schedule.kernel_of_step(i, 8) for i in range(8)] == [7, 7, 5, 5, 3, 3, 1, 1]
    uneven = algo.ShrinkSchedule((5, 1), (3, 1))
    assert [uneven.kernel_of_step(i, 8) for i in range(8)] == [5] * 6 + [1] * 2


def test_shrink_patch_masks_follow_the_schedule(blended, algo, comfy_nodes, tiny_sd15, conds):
    """The masks ComfyUI's sampler receives from the patch at each step (recorded around the
    installed function) are the thresholded latent mask dilated 7, 5, 3, then not at all."""
    steps = 8
    (model,) = blended.ProgressiveMaskShrink.execute(tiny_sd15, "7,5,3,1", "1,1,1,1", 0.5).result
    assert "denoise_mask_function" not in tiny_sd15.model_options  # the user's model is untouched
    installed = model.model_options["denoise_mask_function"]
    recorded = []

    def recorder(sigma, mask, extra_options):
        out = installed(sigma, mask, extra_options)
        recorded.append((algo.step_index(float(sigma[0]), extra_options["sigmas"]), mask.clone(), out.clone()))
        return out

    model = model.clone()
    model.set_model_denoise_mask_function(recorder)
    pixel_mask = box_mask(64, 64, 24, 24, 32, 40) * 0.8  # soft: 0.8 >= threshold
    latent = {"samples": source_latent(), "noise_mask": pixel_mask}
    comfy_nodes.KSampler().sample(model, 1, steps, 5.0, "euler", "normal", conds[0], conds[1], latent, denoise=1.0)
    assert [r[0] for r in recorded] == list(range(steps))
    for step, given, returned in recorded:
        expected = algo.dilate((given >= 0.5).float(), [7, 7, 5, 5, 3, 3, 1, 1][step])
        assert torch.equal(returned, expected), step
    core = recorded[-1][2][0, 0]
    assert core.sum() == 2  # the 8x16-pixel box is 1x2 latent pixels (row 3, columns 3-4) ...
    assert recorded[0][2][0, 0].sum() == 7 * 8  # ... dilated 7x7 in the first stage: rows 0-6, columns 0-7


def test_shrink_chains_an_earlier_mask_function(blended, tiny_sd15):
    calls = []
    base = tiny_sd15.clone()
    base.set_model_denoise_mask_function(lambda s, m, e: calls.append(1) or m)
    (model,) = blended.ProgressiveMaskShrink.execute(base, "3", "1", 0.5).result
    sigmas = torch.tensor([10.0, 5.0, 0.0])
    out = model.model_options["denoise_mask_function"](sigmas[:1], box_mask(8, 8, 3, 3, 4, 4)[:, None], {"sigmas": sigmas})
    assert calls == [1] and out.sum() == 9


@pytest.mark.parametrize("kernels,parts", [("7,5,3", "1,1"), ("6,1", "1,1"), ("a", "1"), ("3,1", "0,1")])
def test_shrink_rejects_bad_schedules(blended, glue, tiny_sd15, kernels, parts):
    with pytest.raises(glue.NodeInputError, match="MC_ProgressiveMaskShrink: input '(kernels|parts)'"):
        blended.ProgressiveMaskShrink.execute(tiny_sd15, kernels, parts, 0.5)


# ---------------------------------------------------------------------------------------------
# The blended sampler

def run_blended(blended, model, conds, latent, mask=None, steps=4, sampler="euler", fresh=True, seed=3, denoise=1.0,
                threshold=0.5, cfg=5.0):
    (out,) = blended.BlendedLatentSampler.execute(model, conds[0], conds[1], latent, seed, steps, cfg, sampler, "normal",
                                                  denoise, fresh, threshold, mask).result
    return out["samples"]


@pytest.mark.parametrize("kernels", ["7,5,3,1", "5,3", "1"])
def test_background_is_the_source_latent_exactly(blended, algo, tiny_sd15, conds, kernels):
    """After a blended edit the latent outside the final mask equals the source latent bit for bit,
    whatever the shrink schedule (the final stage's mask is the one that counts)."""
    (model,) = blended.ProgressiveMaskShrink.execute(tiny_sd15, kernels, ",".join("1" * len(kernels.split(","))), 0.5).result
    source = source_latent()
    mask = box_mask(64, 64, 24, 16, 40, 40)
    out = run_blended(blended, model, conds, {"samples": source}, mask)
    final = algo.dilate(box_mask(8, 8, 3, 2, 5, 5), int(kernels.split(",")[-1])).bool().expand_as(source[:, 0])
    outside = ~final[:, None].expand_as(source)
    assert torch.equal(out[outside], source[outside])
    assert (out[~outside] - source[~outside]).abs().mean() > 0.1  # the edit happened inside


SAMPLERS = ["euler", "ddim", "euler_ancestral", "dpmpp_2m", "heun", "uni_pc"]


@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_sampler_blends_at_the_next_noise_level_with_fresh_noise(glue, algo, tiny_sd15, conds, sampler_name):
    """After step t -> t_prev the background is noise(z_init, t_prev) = z_init + sigma_prev * eps with a new
    eps every step (Alg. 1); with fresh_noise off it is the one initial noise, as ComfyUI's own blend.
    Recorded after every step, for every kind of inner sampler (one-step, ancestral, multistep, second order)."""
    import comfy.sample
    import comfy.samplers

    source = source_latent(7)
    mask = box_mask(8, 8, 2, 2, 6, 6)[:, None].expand(1, 4, 8, 8)
    sigmas = comfy.samplers.KSampler(tiny_sd15, steps=4, device="cpu", sampler="euler", scheduler="normal").sigmas
    scale = tiny_sd15.model.latent_format.scale_factor
    outside = mask == 0
    for fresh in (True, False):
        records = []
        sampler = glue.BlendedSampler(comfy.samplers.sampler_object(sampler_name), fresh, 11,
                                      step_callback=lambda i, x, m: records.append(x.clone()))
        noise = comfy.sample.prepare_noise(source, 11)
        comfy.samplers.sample(tiny_sd15, noise, conds[0], conds[1], 5.0, "cpu", sampler, sigmas, latent_image=source,
                              denoise_mask=mask[:, :1], disable_pbar=True, seed=11)
        assert len(records) == 4
        backgrounds = [(x - source * scale) / float(sigmas[i + 1]) for i, x in enumerate(records[:-1])]
        for eps in backgrounds:  # the background is exactly a unit-variance noise around the source
            assert 0.8 < float(eps[outside].std()) < 1.2
        same_as_initial = [torch.allclose(eps[outside], noise[outside], atol=1e-4) for eps in backgrounds]
        assert all(same_as_initial) == (not fresh) and (not any(same_as_initial)) == fresh
        assert torch.allclose(records[-1][outside], (source * scale)[outside], atol=1e-6)  # clean source at the end
        assert (records[-1][~outside] - (source * scale)[~outside]).abs().mean() > 0.05  # the mask was sampled


def test_sampler_wrapper_for_sampler_custom_advanced(blended, glue, tiny_sd15, conds):
    """MC_BlendedSampler through SamplerCustomAdvanced's path (a guider, the latent's noise mask, the noise
    seed): the background is the source up to the latent scale's float round trip."""
    import comfy.sample
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler

    source = source_latent(8)
    mask = box_mask(64, 64, 16, 16, 48, 48)[:, None] * 0.7  # soft, as Set Latent Noise Mask may give
    (sampler,) = blended.BlendedSamplerWrapper.execute(comfy.samplers.sampler_object("euler_ancestral"), True, 0.5).result
    (guider,) = nodes_custom_sampler.CFGGuider.execute(tiny_sd15, conds[0], conds[1], 5.0).result
    (noise,) = nodes_custom_sampler.RandomNoise.execute(5).result
    sigmas = comfy.samplers.KSampler(tiny_sd15, steps=3, device="cpu", sampler="euler", scheduler="normal").sigmas
    out, _ = nodes_custom_sampler.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas,
                                                                {"samples": source, "noise_mask": mask}).result
    out = out["samples"]
    inside = torch.zeros_like(source, dtype=torch.bool)
    inside[:, :, 2:6, 2:6] = True
    assert torch.allclose(out[~inside], source[~inside], rtol=1e-6, atol=1e-6)
    assert (out[inside] - source[inside]).abs().mean() > 0.1
    with pytest.raises(glue.NodeInputError, match="MC_BlendedSampler: input 'sampler'"):
        blended.BlendedSamplerWrapper.execute(object(), True, 0.5)


def test_fixed_noise_euler_reproduces_comfyui_masked_sampling(blended, comfy_nodes, tiny_sd15, conds):
    """With fixed noise, euler and a binary mask the paper's state blend and ComfyUI's own (blend of the
    model input and of the prediction) give the same trajectory: background z0 + sigma * eps either way.
    So the node must match KSampler + Set Latent Noise Mask, up to float rounding."""
    source = source_latent(12)
    mask = box_mask(64, 64, 16, 8, 48, 40)  # on 8-pixel boundaries: the latent mask is binary
    (reference,) = comfy_nodes.KSampler().sample(tiny_sd15, 21, 4, 5.0, "euler", "normal", conds[0], conds[1],
                                                 {"samples": source, "noise_mask": mask}, denoise=1.0)
    ours = run_blended(blended, tiny_sd15, conds, {"samples": source}, mask, steps=4, sampler="euler", fresh=False, seed=21)
    assert torch.allclose(ours, reference["samples"], atol=1e-4, rtol=1e-4)
    assert not torch.equal(ours, source)


def test_fresh_noise_changes_the_edit_and_is_seeded(blended, tiny_sd15, conds):
    latent = {"samples": source_latent(), "noise_mask": box_mask(64, 64, 16, 16, 48, 48)}
    a = run_blended(blended, tiny_sd15, conds, latent, fresh=True)
    b = run_blended(blended, tiny_sd15, conds, latent, fresh=True)
    c = run_blended(blended, tiny_sd15, conds, latent, fresh=False)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("sampler", ["ddim", "euler_ancestral", "dpmpp_2m", "heun", "uni_pc"])
def test_sampler_choices_keep_the_background(blended, tiny_sd15, conds, sampler):
    """Through the node (the per-step blend is pinned above, for the same samplers): the source outside
    the mask, bit for bit, and an edit inside it."""
    source = source_latent(2)
    mask = box_mask(8, 8, 2, 2, 6, 6)
    out = run_blended(blended, tiny_sd15, conds, {"samples": source}, mask, steps=4, sampler=sampler)
    inside = torch.zeros_like(source, dtype=torch.bool)
    inside[:, :, 2:6, 2:6] = True
    assert torch.isfinite(out).all()
    assert torch.equal(out[~inside], source[~inside])
    assert (out[inside] - source[inside]).abs().mean() > 0.1


def test_denoise_below_one_starts_from_the_noised_source(blended, tiny_sd15, conds):
    """denoise 0.75 (the SD scripts' blending_start_percentage 0.25): the steps are the last 75% of the full
    schedule (ComfyUI's: 4 steps of a 5-step one), and the first model call sees the source noised to that level with the seed's noise,
    inside the mask as outside (not pure noise); the background ends as the source, the mask is edited."""
    import comfy.sample
    import comfy.samplers

    calls = []

    def recording_cfg(args):  # ComfyUI's own combine, recording the model input of each call
        calls.append((float(args["sigma"].reshape(-1)[0]), args["input"].clone()))
        return args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"]

    model = tiny_sd15.clone()
    model.set_model_sampler_cfg_function(recording_cfg)
    source = source_latent(6)
    mask = box_mask(64, 64, 16, 16, 48, 48)
    out = run_blended(blended, model, conds, {"samples": source}, mask, steps=4, denoise=0.75, seed=13)
    sigmas = comfy.samplers.KSampler(tiny_sd15, steps=4, device="cpu", sampler="euler", scheduler="normal", denoise=0.75).sigmas
    full = comfy.samplers.KSampler(tiny_sd15, steps=5, device="cpu", sampler="euler", scheduler="normal").sigmas  # 4 / 0.75
    assert torch.allclose(sigmas, full[-5:]) and float(sigmas[0]) < 0.5 * float(full[0])
    assert [round(c[0], 4) for c in calls] == [round(float(v), 4) for v in sigmas[:-1]]  # euler: one call per step
    scale = tiny_sd15.model.latent_format.scale_factor
    noise = comfy.sample.prepare_noise(source, 13)
    assert torch.allclose((calls[0][1] - source * scale) / float(sigmas[0]), noise, atol=1e-4)
    inside = torch.zeros_like(source, dtype=torch.bool)
    inside[:, :, 2:6, 2:6] = True
    assert torch.equal(out[~inside], source[~inside]) and (out[inside] - source[inside]).abs().mean() > 0.1


@pytest.mark.parametrize("fresh", [True, False])
def test_batch_index_reproduces_an_image_of_the_batch(blended, tiny_sd15, conds, fresh):
    """A latent with batch_index (Latent From Batch, Rebatch) gets the noise of those positions of the full
    batch, as KSampler does: image 2 of a 4-candidate run comes back from a one-image run with
    batch_index [2], and the output keeps batch_index and the noise mask."""
    source = source_latent(9).repeat(4, 1, 1, 1)
    mask = box_mask(64, 64, 16, 16, 48, 48)
    latent = {"samples": source, "noise_mask": mask, "batch_index": [0, 1, 2, 3]}
    (full,) = blended.BlendedLatentSampler.execute(tiny_sd15, conds[0], conds[1], latent, 4, 3, 5.0, "euler", "normal",
                                                   1.0, fresh, 0.5).result
    one_latent = {"samples": source[2:3], "noise_mask": mask, "batch_index": [2]}
    (one,) = blended.BlendedLatentSampler.execute(tiny_sd15, conds[0], conds[1], one_latent, 4, 3, 5.0, "euler", "normal",
                                                  1.0, fresh, 0.5).result
    assert (full["samples"][2] - full["samples"][0]).abs().max() > 0.1  # the candidates differ
    # equal up to float rounding of a different batch size, amplified over the steps (a wrong noise: ~1)
    assert torch.allclose(one["samples"], full["samples"][2:3], atol=1e-2)
    assert one["batch_index"] == [2] and torch.equal(one["noise_mask"], mask)


def test_masks_of_any_size_and_batch(blended, glue, tiny_sd15, conds):
    source = source_latent(3, batch=2)
    # one small soft mask for both images: resized, thresholded
    out = run_blended(blended, tiny_sd15, conds, {"samples": source}, box_mask(16, 16, 4, 4, 12, 12) * 0.6, steps=2)
    assert torch.equal(out[:, :, 0], source[:, :, 0]) and not torch.equal(out[:, :, 4], source[:, :, 4])
    # the same mask below the threshold: nothing is edited
    out = run_blended(blended, tiny_sd15, conds, {"samples": source}, box_mask(16, 16, 4, 4, 12, 12) * 0.4, steps=2)
    assert torch.equal(out, source)
    # one mask per image
    masks = torch.cat([box_mask(64, 64, 0, 0, 32, 32), box_mask(64, 64, 32, 32, 64, 64)])
    out = run_blended(blended, tiny_sd15, conds, {"samples": source}, masks, steps=2)
    assert torch.equal(out[0, :, 4:, 4:], source[0, :, 4:, 4:]) and torch.equal(out[1, :, :4, :4], source[1, :, :4, :4])
    # a full mask edits everything, an empty one nothing
    full = run_blended(blended, tiny_sd15, conds, {"samples": source}, torch.ones(1, 64, 64), steps=2)
    assert (full != source).float().mean() > 0.99
    assert torch.equal(run_blended(blended, tiny_sd15, conds, {"samples": source}, torch.zeros(64, 64), steps=2), source)
    # a mask drawn on a 70x60 image (VAE Encode crops it to 64x56, centred; latent 8x7): cropped alike, aligned
    small = source_latent(4, h=8, w=7)
    drawn = box_mask(70, 60, 3 + 16, 2 + 8, 3 + 32, 2 + 24)  # latent rows 2-3, columns 1-2 after the crop
    out = run_blended(blended, tiny_sd15, conds, {"samples": small}, drawn, steps=2)
    changed = (out != small).any(1)[0]
    expected = torch.zeros(8, 7, dtype=torch.bool)
    expected[2:4, 1:3] = True
    assert torch.equal(changed, expected)
    # three masks for two images, and no mask at all: clear errors
    with pytest.raises(glue.NodeInputError, match="MC_BlendedLatentSampler: input 'mask': has 3 masks for 2 images"):
        run_blended(blended, tiny_sd15, conds, {"samples": source}, torch.ones(3, 64, 64))
    with pytest.raises(glue.NodeInputError, match="MC_BlendedLatentSampler: input 'mask'.*Set Latent Noise Mask"):
        run_blended(blended, tiny_sd15, conds, {"samples": source})


# ---------------------------------------------------------------------------------------------
# Background reconstruction

@pytest.fixture(scope="module")
def edit_case(tiny_vae):
    """A source image, its latent with the masked region replaced (a stand-in for a sampled edit), the mask."""
    source = smooth_image(32, 32)
    mask = box_mask(32, 32, 8, 8, 24, 20)
    with torch.inference_mode():
        z = tiny_vae.encode(source)
    z = z.clone()
    z[:, :, 1:3, 1:3] = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(9))
    return source, z, mask


def errors(algo, tiny_vae, image, z, source, mask):
    """Background MSE against the source (after, and for the plain decode), edited-region MSE
    against the plain decode (after), and how far the source itself is from the plain decode there."""
    with torch.inference_mode():
        plain = tiny_vae.decode(z)
    region = mask[..., None]
    return {"background": algo.masked_mse(image, source, 1 - region),
            "plain_background": algo.masked_mse(plain, source, 1 - region),
            "edited": algo.masked_mse(image, plain, region),
            "source_in_region": algo.masked_mse(source, plain, region)}


def test_decoder_finetune_restores_the_background(blended, algo, tiny_vae, edit_case):
    source, z, mask = edit_case
    before = fingerprint(tiny_vae.first_stage_model)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        (image,) = blended.DecoderFineTune.execute(tiny_vae, {"samples": z}, source, mask, 75, 1e-4, 100.0, 0.5).result
    assert fingerprint(tiny_vae.first_stage_model) == before  # the user's VAE is untouched
    e = errors(algo, tiny_vae, image, z, source, mask)
    factor = e["plain_background"] / e["background"]
    print(f"\ndecoder fine-tune (tiny VAE, 32x32, 75 steps, lr 1e-4, weight 100): background MSE "
          f"{e['plain_background']:.5f} -> {e['background']:.6f} ({factor:.1f}x lower); edited region MSE vs plain decode "
          f"{e['edited']:.5f} (the source there is {e['source_in_region']:.5f} from it)")
    assert image.shape == (1, 32, 32, 3)
    assert factor > 10
    # the edit is kept: the region stays nearer the plain decode of the edit than the source is ...
    assert e["edited"] < e["source_in_region"]
    # ... and nearer than without the edited-region term (the paper's ablation, Fig. 20). Adam is invariant
    # to the loss scale, so a background weight of 1e6 is the background-only loss.
    with torch.inference_mode():
        (bg_only,) = blended.DecoderFineTune.execute(tiny_vae, {"samples": z}, source, mask, 75, 1e-4, 1e6, 0.5).result
    ablation = errors(algo, tiny_vae, bg_only, z, source, mask)
    print(f"without the edited-region term: edited region MSE vs plain decode {ablation['edited']:.5f}")
    assert e["edited"] < ablation["edited"]


def test_latent_optimization_lowers_the_background_error(blended, algo, tiny_vae, edit_case):
    source, z, mask = edit_case
    before = fingerprint(tiny_vae.first_stage_model)
    with torch.inference_mode():
        image, latent = blended.LatentOptimization.execute(tiny_vae, {"samples": z}, source, mask, 75, 0.1, 100.0, 0.5).result
    assert fingerprint(tiny_vae.first_stage_model) == before
    e = errors(algo, tiny_vae, image, z, source, mask)
    print(f"\nlatent optimisation (tiny VAE, 32x32, 75 steps, lr 0.1): background MSE {e['plain_background']:.5f} -> "
          f"{e['background']:.6f}; edited region MSE vs plain decode {e['edited']:.5f} (source: {e['source_in_region']:.5f})")
    assert e["background"] < 0.8 * e["plain_background"]  # lower, though far less than the decoder fine-tune (Sec. 4.2)
    assert latent["samples"].shape == z.shape and not torch.equal(latent["samples"], z)
    # Eq. 1's edited-region term keeps the edit: the region stays nearer the plain decode than the source is,
    # and nearer than with the background term alone (Adam ignores the loss scale: weight 1e6 = background only)
    assert e["edited"] < e["source_in_region"]
    with torch.inference_mode():
        bg_only, _ = blended.LatentOptimization.execute(tiny_vae, {"samples": z}, source, mask, 75, 0.1, 1e6, 0.5).result
        edit_only, edit_only_latent = blended.LatentOptimization.execute(tiny_vae, {"samples": z}, source, mask, 5, 0.1, 0.0, 0.5).result
    ablation = errors(algo, tiny_vae, bg_only, z, source, mask)
    print(f"without the edited-region term: edited region MSE vs plain decode {ablation['edited']:.5f}")
    assert e["edited"] < 0.99 * ablation["edited"]  # small at weight 100, but there (identical runs without it)
    # the edited-region term alone starts at zero, its target being the plain decode: nothing moves
    assert torch.equal(edit_only_latent["samples"], z) and errors(algo, tiny_vae, edit_only, z, source, mask)["edited"] < 1e-10
    # the returned latent is the one whose decode is the returned image
    with torch.inference_mode():
        assert torch.allclose(tiny_vae.decode(latent["samples"]), image, atol=1e-4)


def test_reconstruction_handles_batches_sizes_and_degenerate_masks(blended, algo, glue, tiny_vae):
    # a 70x60 source (not a multiple of 8): VAE Encode crops it centred to 64x56; so do we
    source = smooth_image(70, 60, seed=1)
    with torch.inference_mode():
        z = tiny_vae.encode(source).clone()
    z2 = torch.cat([z, z + 0.1])
    masks = torch.cat([torch.zeros(1, 70, 60), torch.ones(1, 70, 60)])  # empty and full, one per image
    with torch.inference_mode():
        (image,) = blended.DecoderFineTune.execute(tiny_vae, {"samples": z2}, source, masks, 3, 1e-4, 100.0, 0.5).result
    assert image.shape == (2, 64, 56, 3) and torch.isfinite(image).all()
    # a full mask has no background term and the edited-region loss starts at zero: the decode is unchanged
    with torch.inference_mode():
        plain = tiny_vae.decode(z2[1:])
    assert torch.allclose(image[1:], plain, atol=1e-5)
    with pytest.raises(glue.NodeInputError, match="MC_DecoderFineTune: input 'source_image': is 32x32 pixels"):
        blended.DecoderFineTune.execute(tiny_vae, {"samples": z}, smooth_image(32, 32), masks[:1], 1, 1e-4, 100.0, 0.5)
    with pytest.raises(glue.NodeInputError, match="MC_LatentOptimization: input 'mask': has 2 masks for 1 images"):
        blended.LatentOptimization.execute(tiny_vae, {"samples": z}, source, masks, 1, 0.1, 100.0, 0.5)


# ---------------------------------------------------------------------------------------------
# Pixel blending

def test_paste_and_poisson_keep_the_background(blended, algo):
    # values in [0.4, 0.6]: the Poisson solution is the edit plus a harmonic correction bounded by the
    # boundary differences (maximum principle), so nothing is clamped to [0, 1] and the Laplacians compare
    source = 0.4 + 0.2 * smooth_image(40, 36, seed=2)
    mask = box_mask(40, 36, 10, 8, 30, 28)
    edited = 0.4 + 0.2 * smooth_image(40, 36, seed=3)
    (pasted,) = blended.PixelBlend.execute(edited, source, mask, "paste", 0.0, 0.5).result
    inside = mask[..., None].bool().expand_as(source)
    assert torch.equal(pasted[~inside], source[~inside]) and torch.equal(pasted[inside], edited[inside])
    (seamless,) = blended.PixelBlend.execute(edited, source, mask, "poisson", 0.0, 0.5).result
    assert torch.equal(seamless[~inside], source[~inside])

    # Poisson: the result's Laplacian inside the mask is the edit's (the guidance field) ...
    def laplacian(img):
        x = img[0].double()
        return 4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]
    interior = mask[0, 1:-1, 1:-1].bool()
    assert torch.allclose(laplacian(seamless)[interior], laplacian(edited)[interior], atol=1e-4)
    # ... so a decode whose colours are off by a constant (a VAE's reconstruction drift) blends into the
    # source without a seam: the masked region comes back as the source itself, where a paste keeps the offset
    shifted = source + 0.2
    (restored,) = blended.PixelBlend.execute(shifted, source, mask, "poisson", 0.0, 0.5).result
    assert (restored - source).abs().max() < 1e-4
    (hard,) = blended.PixelBlend.execute(shifted, source, mask, "paste", 0.0, 0.5).result
    assert (hard - source)[inside].abs().min() > 0.19


def test_pixel_blend_feather_and_masks(blended, glue):
    source = torch.zeros(2, 33, 41, 3)
    edited = torch.ones(2, 33, 41, 3)
    (soft,) = blended.PixelBlend.execute(edited, source, box_mask(11, 11, 3, 3, 8, 8), "paste", 4.0, 0.5).result
    assert soft.shape == (2, 33, 41, 3)
    values = soft[0, :, :, 0]
    assert values.max() > 0.95 and 0.05 < values[16, 8] < 0.95  # a soft edge on the box border
    (full,) = blended.PixelBlend.execute(edited, source, torch.ones(1, 5, 5), "poisson", 0.0, 0.5).result
    assert torch.equal(full, edited)
    (empty,) = blended.PixelBlend.execute(edited, source, torch.zeros(1, 5, 5), "poisson", 0.0, 0.5).result
    assert torch.equal(empty, source)
    # a 70x60 source whose edit was decoded at 64x56: the source is cropped as VAE Encode crops it
    big_source = torch.rand(1, 70, 60, 3)
    (cropped,) = blended.PixelBlend.execute(torch.ones(1, 64, 56, 3), big_source, torch.zeros(1, 70, 60), "paste", 0.0, 0.5).result
    assert torch.equal(cropped, big_source[:, 3:67, 2:58])
    with pytest.raises(glue.NodeInputError, match="MC_PixelBlend: input 'source_image'"):
        blended.PixelBlend.execute(edited, torch.zeros(3, 33, 41, 3), torch.ones(1, 5, 5), "paste", 0.0, 0.5)


# ---------------------------------------------------------------------------------------------
# Ranking

class RednessCLIP:
    """A duck-typed MC_CLIP (not a pack class): image features say how red the image is; the text 'red'
    points at redness. Enough to know the right order of a batch."""
    image_size, mean, std = 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def encode_image(self, images):
        red = images[..., 0].mean((1, 2)) - images[..., 1:].mean((1, 2, 3))
        return torch.nn.functional.normalize(torch.stack([red, torch.full_like(red, 0.2)], 1), dim=-1)

    def encode_text(self, prompts):
        return torch.nn.functional.normalize(torch.tensor([[1.0, 0.0]] * len(prompts)), dim=-1)


def test_rank_sorts_images_and_latents_by_masked_similarity(blended, glue):
    images = torch.zeros(4, 16, 16, 3)
    redness = [0.2, 0.9, 0.0, 0.5]
    for i, r in enumerate(redness):
        images[i, 4:12, 4:12, 0] = r
    images[2, :4, :, 0] = 1.0  # red outside the mask does not count
    latent = {"samples": torch.arange(4.0).reshape(4, 1, 1, 1).expand(4, 4, 2, 2).clone()}
    out_images, out_latent, scores = blended.RankByCLIP.execute(RednessCLIP(), images, latent, box_mask(16, 16, 4, 4, 12, 12),
                                                                "red", 0, 0.5).result
    assert [int(v) for v in out_latent["samples"][:, 0, 0, 0]] == [1, 3, 0, 2]
    assert torch.equal(out_images, images[[1, 3, 0, 2]])
    lines = scores.splitlines()
    assert len(lines) == 4 and lines[0].startswith("1. image 1: similarity")
    similarities = [float(line.rsplit(" ", 1)[1]) for line in lines]
    assert similarities == sorted(similarities, reverse=True)
    # keep = 2 keeps the two best, best first; a per-image noise mask and batch_index follow the images,
    # a single shared noise mask is left as it is
    per_image = {**latent, "noise_mask": torch.arange(4.0).reshape(4, 1, 1, 1).expand(4, 1, 16, 16).clone(),
                 "batch_index": [10, 11, 12, 13]}
    top, top_latent, top_scores = blended.RankByCLIP.execute(RednessCLIP(), images, per_image, box_mask(16, 16, 4, 4, 12, 12),
                                                             "red", 2, 0.5).result
    assert torch.equal(top, images[[1, 3]]) and [int(v) for v in top_latent["samples"][:, 0, 0, 0]] == [1, 3]
    assert [int(v) for v in top_latent["noise_mask"][:, 0, 0, 0]] == [1, 3] and top_latent["batch_index"] == [11, 13]
    assert top_scores.splitlines() == lines[:2]
    shared = {**latent, "noise_mask": torch.ones(1, 1, 16, 16)}
    _, kept, _ = blended.RankByCLIP.execute(RednessCLIP(), images, shared, box_mask(16, 16, 4, 4, 12, 12), "red", 3, 0.5).result
    assert torch.equal(kept["noise_mask"], shared["noise_mask"]) and kept["samples"].shape[0] == 3
    with pytest.raises(glue.NodeInputError, match="MC_RankByCLIP: input 'mask': is empty"):
        blended.RankByCLIP.execute(RednessCLIP(), images, latent, torch.zeros(1, 16, 16), "red", 0, 0.5)
    with pytest.raises(glue.NodeInputError, match="MC_RankByCLIP: input 'latent'"):
        blended.RankByCLIP.execute(RednessCLIP(), images, {"samples": latent["samples"][:3]}, torch.ones(1, 16, 16), "red", 0, 0.5)
