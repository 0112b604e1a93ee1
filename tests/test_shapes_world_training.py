"""Each training command runs end to end for a few steps on a tiny setting (as a user runs it:
`python -m training.train_X` from the pack root), and leaves weights the loader's builders
accept, a loss-curve PNG and a JSON record."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import comfy_harness


def run_command(module: str, out, *extra):
    env = dict(os.environ, MC_COMFYUI=str(comfy_harness.COMFY_DIR))
    cmd = [sys.executable, "-m", module, "--tiny", "--out", str(out), "--threads", "1", *extra]
    proc = subprocess.run(cmd, cwd=comfy_harness.PACK_DIR, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def check_record(out, stem: str) -> dict:
    from PIL import Image
    rec = json.loads((out / f"{stem}.json").read_text())
    for key in ("command", "seed", "train_seconds", "final_loss", "steps", "finished_utc"):
        assert key in rec, key
    assert f"training.train_" in rec["command"] and math.isfinite(rec["final_loss"]) and rec["steps"] >= 1
    png = Image.open(out / rec["loss_curve"]).convert("RGB")
    assert png.size == (720, 420)
    colours = {c for _, c in png.getcolors(1 << 20)}
    assert (20, 40, 160) in colours or len(colours) > 3  # something was drawn
    return rec


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_world_tiny")
    logs = {name: run_command(f"training.train_{name}", out) for name in ("vae", "clip", "unet")}
    return out, logs


def test_train_vae_tiny(trained_tiny, pack_module):
    out, logs = trained_tiny
    assert "[vae] step 1/" in logs["vae"] and "[vae] done" in logs["vae"]
    rec = check_record(out, "vae")
    assert rec["scale_factor"] > 0 and "heldout_psnr_db" in rec
    models = pack_module("nodes.shapes_world.models")
    vae = models.build_vae(models.load_weights(out / models.VAE_FILE))
    assert vae.encode(torch.rand(1, 128, 128, 3)).shape == (1, 4, 16, 16)


def test_train_clip_tiny(trained_tiny, pack_module):
    out, logs = trained_tiny
    assert "[clip] done" in logs["clip"]
    rec = check_record(out, "clip")
    assert 0 <= rec["heldout_retrieval"]["image_to_text_top1"] <= 1
    models = pack_module("nodes.shapes_world.models")
    sd = models.load_weights(out / models.CLIP_FILE)
    oc = models.build_open_clip(sd)
    assert torch.equal(oc.token_embedding.weight, sd["token_embedding.weight"])


def test_train_unet_tiny(trained_tiny, pack_module):
    out, logs = trained_tiny
    assert "[unet] done" in logs["unet"]
    rec = check_record(out, "unet")
    assert rec["vae_trained"] and rec["clip_trained"]  # it used the tiny VAE and CLIP made above
    vae_rec = json.loads((out / "vae.json").read_text())
    assert rec["scale_factor"] == pytest.approx(vae_rec["scale_factor"])
    assert (out / "unet_samples.png").exists()
    models = pack_module("nodes.shapes_world.models")
    patcher = models.build_model_patcher(rec["scale_factor"], models.load_weights(out / models.UNET_FILE))
    assert patcher.model.latent_format.scale_factor == pytest.approx(rec["scale_factor"])
    bundle = models.load_bundle("trained", weights_dir=out)
    assert all(bundle["trained"].values())


def test_training_schedule_is_comfyui_sd1(pack_module):
    """diffusers' scaled-linear DDPM schedule used for noising = ComfyUI's SD1 discrete sigmas."""
    from diffusers import DDPMScheduler
    models = pack_module("nodes.shapes_world.models")
    s = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ours = ((1 - s.alphas_cumprod) / s.alphas_cumprod).sqrt().float()
    comfy = models.build_base_model().model_sampling.sigmas.float()
    assert torch.allclose(ours, comfy, rtol=1e-4)
    assert not torch.allclose(ours, torch.linspace(float(ours[0]), float(ours[-1]), 1000), rtol=1e-2)


def test_loss_curve_drawing(tmp_path):
    """The pillow loss plot: a falling loss is drawn falling (smoothed line's right end lower)."""
    import importlib
    import importlib.util
    pkg = comfy_harness.PACK_DIR / "training"  # loaded by path: the pack root never goes on sys.path
    if "mc_training" not in sys.modules:
        spec = importlib.util.spec_from_file_location("mc_training", pkg / "__init__.py",
                                                      submodule_search_locations=[str(pkg)])
        sys.modules["mc_training"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    save_loss_curve = importlib.import_module("mc_training.common").save_loss_curve
    from PIL import Image
    save_loss_curve([(i, 1.0 / i) for i in range(1, 400)], tmp_path / "c.png")
    img = Image.open(tmp_path / "c.png").convert("RGB")
    px = img.load()
    dark = [(x, y) for x in range(img.width) for y in range(img.height) if px[x, y] == (20, 40, 160)]
    left = [y for x, y in dark if x < 150]
    right = [y for x, y in dark if x > 600]
    assert left and right and min(right) > max(left) - 5  # y grows downward: lower loss is drawn lower
