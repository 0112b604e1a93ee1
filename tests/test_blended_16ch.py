"""The blended-editing nodes on 16-channel latents: tiny SD3 (MMDiT) and Flux models and a tiny
16-channel VAE, all built with ComfyUI's own classes."""
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
def models():
    return {"sd3": tiny_models.tiny_sd3(seed=0), "flux": tiny_models.tiny_flux(seed=0, guidance_embed=True)}


@pytest.fixture(scope="module")
def vae16():
    return tiny_models.tiny_vae16(seed=3)


def conds(kind):
    family = "sd3" if kind == "sd3" else "flux"
    positive, negative = tiny_models.dit_conditioning(family, 1), tiny_models.dit_conditioning(family, 2)
    if kind == "flux":
        for c in (positive, negative):
            c[0][1]["guidance"] = 3.5
    return positive, negative


def source_latent(seed=5, batch=1, h=8, w=8):
    return torch.randn(batch, 16, h, w, generator=torch.Generator().manual_seed(seed))


def run_blended(blended, model, conds, latent, mask=None, steps=4, sampler="euler", fresh=True, seed=3, cfg=3.0):
    (out,) = blended.BlendedLatentSampler.execute(model, conds[0], conds[1], latent, seed, steps, cfg, sampler, "simple",
                                                  1.0, fresh, 0.5, mask).result
    return out["samples"]


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("kernels", ["5,3,1", "1"])
def test_shrink_and_blended_sampler_keep_the_background(blended, algo, models, kind, kernels):
    """Outside the final (shrunk) mask the 16-channel latent is the source, up to the latent
    format's float round trip (SD3/Flux latents are shifted as well as scaled); inside, an edit."""
    (model,) = blended.ProgressiveMaskShrink.execute(models[kind], kernels, ",".join("1" * len(kernels.split(","))), 0.5).result
    source = source_latent()
    out = run_blended(blended, model, conds(kind), {"samples": source}, box_mask(64, 64, 24, 16, 40, 40))
    final = algo.dilate(box_mask(8, 8, 3, 2, 5, 5), int(kernels.split(",")[-1])).bool()
    outside = ~final[:, None].expand_as(source)
    assert out.shape == source.shape
    assert torch.allclose(out[outside], source[outside], atol=1e-5)
    assert (out[~outside] - source[~outside]).abs().mean() > 0.1


def test_blended_sampler_wrapper_on_flux(blended, models):
    """MC_BlendedSampler with SamplerCustomAdvanced and ComfyUI's CFGGuider on a 16-channel latent."""
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler

    model = models["flux"]
    positive, negative = conds("flux")
    source = source_latent(8)
    (sampler,) = blended.BlendedSamplerWrapper.execute(comfy.samplers.sampler_object("euler"), True, 0.5).result
    (guider,) = nodes_custom_sampler.CFGGuider.execute(model, positive, negative, 1.0).result
    (noise,) = nodes_custom_sampler.RandomNoise.execute(5).result
    (sigmas,) = nodes_custom_sampler.BasicScheduler.execute(model, "simple", 3, 1.0).result
    out, _ = nodes_custom_sampler.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas,
                                                                {"samples": source, "noise_mask": box_mask(64, 64, 16, 16, 48, 48)}).result
    out = out["samples"]
    inside = torch.zeros_like(source, dtype=torch.bool)
    inside[:, :, 2:6, 2:6] = True
    assert torch.allclose(out[~inside], source[~inside], atol=1e-5)
    assert (out[inside] - source[inside]).abs().mean() > 0.1


@pytest.fixture(scope="module")
def edit_case(vae16):
    source = smooth_image(32, 32)
    mask = box_mask(32, 32, 8, 8, 24, 20)
    with torch.inference_mode():
        z = vae16.encode(source)
    z = z.clone()
    assert z.shape == (1, 16, 4, 4)
    z[:, :, 1:3, 1:3] = torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(9))
    return source, z, mask


def background_errors(algo, vae, image, z, source, mask):
    with torch.inference_mode():
        plain = vae.decode(z)
    outside = 1 - mask[..., None]
    return algo.masked_mse(image, source, outside), algo.masked_mse(plain, source, outside)


def test_decoder_finetune_on_a_16_channel_vae(blended, algo, vae16, edit_case):
    source, z, mask = edit_case
    before = fingerprint(vae16.first_stage_model)
    with torch.inference_mode():
        (image,) = blended.DecoderFineTune.execute(vae16, {"samples": z}, source, mask, 40, 1e-4, 100.0, 0.5).result
    assert fingerprint(vae16.first_stage_model) == before
    after, plain = background_errors(algo, vae16, image, z, source, mask)
    assert image.shape == (1, 32, 32, 3) and after < 0.2 * plain


def test_latent_optimization_on_a_16_channel_vae(blended, algo, vae16, edit_case):
    source, z, mask = edit_case
    with torch.inference_mode():
        image, latent = blended.LatentOptimization.execute(vae16, {"samples": z}, source, mask, 40, 0.1, 100.0, 0.5).result
    after, plain = background_errors(algo, vae16, image, z, source, mask)
    assert latent["samples"].shape == z.shape and after < 0.8 * plain


class RednessCLIP:
    """A duck-typed MC_CLIP: image features say how red the image is."""
    image_size, mean, std = 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def encode_image(self, images):
        red = images[..., 0].mean((1, 2)) - images[..., 1:].mean((1, 2, 3))
        return torch.nn.functional.normalize(torch.stack([red, torch.full_like(red, 0.2)], 1), dim=-1)

    def encode_text(self, prompts):
        return torch.nn.functional.normalize(torch.tensor([[1.0, 0.0]] * len(prompts)), dim=-1)


def test_rank_by_clip_sorts_16_channel_latents(blended):
    images = torch.zeros(3, 16, 16, 3)
    for i, r in enumerate([0.1, 0.9, 0.5]):
        images[i, 4:12, 4:12, 0] = r
    latent = {"samples": torch.arange(3.0).reshape(3, 1, 1, 1).expand(3, 16, 2, 2).clone()}
    _, out_latent, _ = blended.RankByCLIP.execute(RednessCLIP(), images, latent, box_mask(16, 16, 4, 4, 12, 12), "red", 0, 0.5).result
    assert out_latent["samples"].shape == (3, 16, 2, 2)
    assert [int(v) for v in out_latent["samples"][:, 0, 0, 0]] == [1, 2, 0]
    assert all(torch.equal(s, s[0, 0, 0].expand_as(s)) for s in out_latent["samples"])  # all 16 channels move together
