"""The shapes-world CDD-ICM composer: built from ComfyUI's UNetModel and the shapes-world UNet with
zero-initialised extras (so it starts as the text-to-image UNet), and its training command run for a
step per stage (CI's tiny setting).

Run: python -m pytest tests/test_composition_model.py -q
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import comfy_harness


@pytest.fixture(scope="module")
def composer_mod(pack_module):
    return pack_module("nodes.shapes_world.composer")


@pytest.fixture(scope="module")
def models(pack_module):
    return pack_module("nodes.shapes_world.models")


def test_denoiser_starts_as_the_text_to_image_unet(composer_mod, models):
    """ComfyUI's UNetModel with 4 extra input channels (reference latent), 4 extra output channels (v)
    and the label embedding for c: zero-initialised, so eps equals the base UNet's for any reference and
    any c, v = 0 (rho = 1/2), and the class of the network is ComfyUI's own."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    base = models.build_base_model(seed=7).diffusion_model
    unet = composer_mod.build_unet(16, base.state_dict(), seed=1)
    assert isinstance(unet, UNetModel) and unet.in_channels == 8 and unet.out_channels == 8
    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    context, c = torch.randn(2, 93, 128, generator=g), torch.randn(2, 16, generator=g)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        out = unet(torch.cat([x, ref], 1), timesteps=t, context=context, y=c)
        expected = base(x, timesteps=t, context=context)
    assert torch.equal(out[:, :4], expected) and bool((out[:, 4:] == 0).all())
    # the extras are live: once trained, the reference and c change the output
    with torch.no_grad():
        unet.input_blocks[0][0].weight[:, 4:].normal_(0, 0.1, generator=g)
        moved = unet(torch.cat([x, ref], 1), timesteps=t, context=context, y=c)
    assert (moved[:, :4] - expected).abs().max() > 1e-3


def test_composer_condition_shapes_and_gradients(composer_mod):
    composer = composer_mod.build_composer(dim=32, seed=0, use_trained=False)
    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[:, 0], tokens[:, 1], tokens[:, 2] = 49406, 320, 49407
    images = torch.rand(2, 128, 128, 3, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(False), torch.enable_grad():
        c, context = composer.condition(images, tokens)
        assert c.shape == (2, 32) and context.shape == (2, 16 + 77, 128)
        loss = composer_mod.cdd_icm().icm_loss(c, composer.target_embedding(images), composer.tau())
        loss.backward()
    assert composer.fusion.gate.weight.grad.abs().sum() > 0 and composer.tau.log_tau.grad is not None


def test_train_composer_tiny_runs_every_stage(tmp_path, composer_mod):
    env = dict(os.environ, MC_COMFYUI=str(comfy_harness.COMFY_DIR))
    cmd = [sys.executable, "-m", "training.train_composer", "--tiny", "--base", "random", "--threads", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=comfy_harness.PACK_DIR, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for stage in (1, 2, 3):
        assert f"stage {stage} from step {stage - 1}" in proc.stdout
    rec = json.loads((tmp_path / "composer.json").read_text())
    assert rec["steps"] == 3 and all(math.isfinite(rec["stage_final_loss"][str(s)]) for s in (1, 2, 3))
    assert rec["eta"] == 1e-3 and rec["delta"] == 0.1 and rec["gamma"] == 1.5 and rec["cond_drop"] == 0.2
    import safetensors.torch

    saved = safetensors.torch.load_file(str(tmp_path / "composer.safetensors"))
    fresh = composer_mod.build_composer(dim=128, seed=0, use_trained=False).state_dict()
    # the vocabulary table never trains and is read from the shapes-world CLIP: not in the file
    assert set(saved) == set(fresh) - set(composer_mod.FROZEN_FROM_CLIP)
    assert all(saved[k].shape == fresh[k].shape for k in saved)
    composer = composer_mod.build_composer(dim=128, seed=1, use_trained=False)
    composer_mod.load_shipped_state(composer, saved)
    assert all(torch.equal(v, saved[k].to(v.dtype)) for k, v in composer.state_dict().items() if k in saved)
    with pytest.raises(ValueError, match="do not fit this composer"):
        composer_mod.load_shipped_state(composer, {k: v for k, v in saved.items() if not k.startswith("fusion.")})
    assert not any(p is composer.token_embedding.weight for p in composer.backbone_parameters())


def test_composer_encoders_come_from_the_dual_encoder_not_a_text_encoder_beside_it(tmp_path, composer_mod, models):
    """A weights folder may hold a separately trained text encoder for the UNet's CLIPTextEncode
    (shapes world v2). The composer's vocabulary table is left out of its file and read at build time,
    so it must come from the dual encoder it was trained with, whatever text encoder lies beside it."""
    import safetensors.torch

    for name in (models.CLIP_FILE, models.UNET_FILE, models.VAE_FILE):
        for path in (models.WEIGHTS_DIR / name, (models.WEIGHTS_DIR / name).with_suffix(".json")):
            if path.exists():
                (tmp_path / path.name).symlink_to(path)
    clip_sd = models.load_weights(models.WEIGHTS_DIR / models.CLIP_FILE)
    shifted = {k: v.float() + 1.0 for k, v in clip_sd.items() if k.startswith(("token_embedding", "positional_embedding"))}
    safetensors.torch.save_file(shifted, str(tmp_path / models.TEXT_ENCODER_FILE))
    composer = composer_mod.build_composer(tmp_path, seed=0)
    table = composer.state_dict()["token_embedding.weight"]
    assert torch.equal(table, clip_sd["token_embedding.weight"].to(table.dtype))


def test_stage_parameter_groups_learning_rates(composer_mod):
    """Stages 1-2 train the CLIP backbones at lr * eta; stage 3 trains only the noisy-image encoder,
    its backbone at lr * noisy_eta; a group at lr 0 (a frozen backbone) is left out."""
    train_composer = comfy_harness.training_module("train_composer")
    composer = composer_mod.build_composer(dim=32, seed=0, use_trained=False)
    ids = lambda params: {id(q) for q in params}  # noqa: E731
    lr, eta = 1e-4, 1e-3
    by_stage = {s: train_composer.stage_parameter_groups(composer, s, lr, eta, noisy_eta=0.5) for s in (1, 2, 3)}
    backbone, noisy = ids(composer.backbone_parameters()), ids(composer.backbone_parameters(noisy=True))
    assert [g["lr"] for g in by_stage[1]] == [lr * eta, lr] and ids(by_stage[1][0]["params"]) == backbone
    assert [g["lr"] for g in by_stage[2]] == [lr * eta, lr, lr]
    assert ids(by_stage[2][2]["params"]) == ids(composer.unet.parameters())
    assert [g["lr"] for g in by_stage[3]] == [lr * 0.5, lr] and ids(by_stage[3][0]["params"]) == noisy
    assert not noisy & backbone
    frozen = train_composer.stage_parameter_groups(composer, 3, lr, eta, noisy_eta=0.0)
    assert [g["lr"] for g in frozen] == [lr] and ids(frozen[0]["params"]) == ids(composer.noisy_head_parameters())
