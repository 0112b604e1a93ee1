"""Semantic diffusion guidance on the shipped shapes-world models: the shipped noise-aware encoder
fits the shipped model, agrees with the clean dual encoder at the lowest noise level, and one
guidance step raises the guidance function; a workflow runs through ComfyUI's executor."""
from __future__ import annotations

import json

import pytest
import torch

import comfy_harness

WEIGHTS = comfy_harness.PACK_DIR / "models" / "shapes_world"
MAX_MB = 25
MIN_LOWEST_NOISE_COSINE = 0.8  # mean cosine with the clean encoder on held-out scenes (see the record)
MIN_MIDDLE_NOISE_COSINE = 0.4  # at t=500 (σ 1.6): the fine-tune's gain (the stem warm-up alone gave 0.08)


@pytest.fixture(scope="module")
def bundle(pack_module):
    return pack_module("nodes.shapes_world_loader").load("trained", 0)


@pytest.fixture(scope="module")
def shipped(pack_module):
    sdg = pack_module("nodes.sdg")
    path = sdg.SHAPES_WORLD_ENCODER_PATH
    assert path.exists(), f"{path} is not shipped: semantic guidance's workflows need it"
    assert path.stat().st_size <= MAX_MB * 2**20
    rec = json.loads(path.with_suffix(".json").read_text())
    assert (WEIGHTS / rec["loss_curve"]).exists()
    (encoder,) = sdg.NoiseAwareEncoderLoader.execute(sdg.SHAPES_WORLD_ENCODER).result
    return encoder, rec


def test_shipped_encoder_fits_the_shipped_model_and_agrees_with_clean_clip(pack_module, bundle, shipped):
    glue, world = pack_module("nodes.glue"), pack_module("nodes.shapes_world.world")
    encoder, rec = shipped
    glue.check_encoder_fits(encoder, bundle["model"], "test")  # same latent format, channels and scale
    model, vae, mc_clip = bundle["model"], bundle["vae"], bundle["mc_clip"]
    sampling = model.get_model_object("model_sampling")
    seeds = range(world.HELD_OUT_SEED_START + 7000, world.HELD_OUT_SEED_START + 7032)
    images, _ = world.batch(seeds)
    x = torch.from_numpy(images).float() / 255
    with torch.no_grad():
        clean = mc_clip.encode_image(x).float()
        latents = model.model.process_latent_in(vae.encode(x).float())
        cosines = {}
        for index in (0, 499, 999):
            sigma = sampling.sigmas[index].float().expand(len(seeds))
            noisy = sampling.noise_scaling(sigma, torch.randn(latents.shape, generator=torch.Generator().manual_seed(index)), latents)
            emb, _ = encoder.encoder(sampling.calculate_input(sigma, noisy), sigma)
            cosines[index] = float((emb * clean).sum(-1).mean())
    print(f"\nshipped noise-aware encoder vs clean encoder, mean cosine on 32 held-out scenes: "
          f"lowest noise {cosines[0]:.3f}, t=500 {cosines[499]:.3f}, highest {cosines[999]:.3f}; "
          f"record: {rec.get('heldout', {}).get('lowest')}")
    assert cosines[0] > MIN_LOWEST_NOISE_COSINE
    assert cosines[499] > MIN_MIDDLE_NOISE_COSINE  # it reads the middle of the schedule, where guidance starts
    assert cosines[0] > cosines[999]  # pure noise says less about the scene than a clean latent


@pytest.mark.parametrize("kind", ["text", "content", "structure", "style"])
def test_one_step_raises_the_guidance_function_on_the_shapes_world(comfy_nodes, pack_module, bundle, shipped, kind):
    sdg, glue, world = pack_module("nodes.sdg"), pack_module("nodes.glue"), pack_module("nodes.shapes_world.world")
    encoder, _ = shipped
    model, vae, mc_clip, clip = bundle["model"], bundle["vae"], bundle["mc_clip"], bundle["clip"]
    reference = torch.from_numpy(world.generate(world.HELD_OUT_SEED_START + 77).image[None]).float() / 255
    if kind == "text":
        (guidance,) = sdg.TextGuidance.execute(mc_clip, "a big red circle", 1.0).result
    elif kind == "style":
        (guidance,) = sdg.ImageStyleGuidance.execute(mc_clip, reference, 1.0, "auto").result
    else:
        (guidance,) = sdg.ImageContentGuidance.execute(mc_clip, reference, 1.0, kind == "structure", "auto").result
    (patched,) = sdg.ApplySemanticGuidance.execute(model, guidance, "noise-aware", 0.0, 1.0, 1, 0, vae=vae,
                                                   noise_aware_encoder=encoder).result
    hook = glue.guidance_hook(patched)
    empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    seen = []

    def check(args):
        if seen:
            return args["denoised"]
        delta = hook(args) - args["denoised"]
        x, sigma = args["input"], args["sigma"]
        step = 1e-2 * delta / delta.abs().max()
        with torch.no_grad():
            before = hook._value_noise_aware(args["model"], x, sigma, hook.step_seed(sigma))
            after = hook._value_noise_aware(args["model"], x + step, sigma, hook.step_seed(sigma))
        seen.append((before, after))
        return args["denoised"]

    recording = model.clone()
    recording.set_model_sampler_post_cfg_function(check)
    comfy_nodes.common_ksampler(recording, 3, 4, 1.0, "euler", "normal", empty, empty, {"samples": torch.zeros(2, 4, 16, 16)},
                                start_step=2, last_step=3, force_full_denoise=False)  # a mid-schedule step
    before, after = seen[0]
    assert (after > before).all(), (kind, before, after)


def test_text_guidance_workflow_in_the_executor(run_prompt):
    """The shipped workflow, through ComfyUI's executor (inference mode, the real node graph)."""
    import numpy
    from PIL import Image

    import folder_paths

    prompt = json.loads((comfy_harness.PACK_DIR / "workflows" / "src" / "sdg_text_guidance.api.json").read_text())
    prompt["22"]["inputs"]["steps"] = 6
    outputs = run_prompt(prompt)
    saved = outputs["9"]["images"]
    assert len(saved) == prompt["21"]["inputs"]["batch_size"]
    pictures = [numpy.asarray(Image.open(f"{folder_paths.get_directory_by_type(i['type'])}/{i['subfolder']}/{i['filename']}"))
                for i in saved]
    assert all(p.shape == (128, 128, 3) and p.std() > 0 for p in pictures)


def test_training_command_runs_on_a_tiny_setting(tmp_path):
    """`python -m training.train_noise_aware --tiny`: weights the loader reads (with their record in
    the safetensors metadata), a loss curve and a JSON record with held-out cosines."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MC_COMFYUI=str(comfy_harness.COMFY_DIR))
    cmd = [sys.executable, "-m", "training.train_noise_aware", "--tiny", "--out", str(tmp_path), "--threads", "1"]
    proc = subprocess.run(cmd, cwd=comfy_harness.PACK_DIR, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rec = json.loads((tmp_path / "noise_aware.json").read_text())
    assert rec["steps"] == 3 and len(rec["loss_history"]) == 3 and (tmp_path / rec["loss_curve"]).exists()
    assert set(rec["heldout"]) >= {"lowest", "highest", "n"} and rec["stem_warmup"]["steps"] == 2
    meta = rec["encoder_record"]
    assert meta["mc_kind"] == "noise_aware_encoder" and meta["latent_channels"] == "4"
