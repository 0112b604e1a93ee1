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
    # the record's loss history is the run's: its mean over the last window is the final loss
    history = [v for _, v in rec["loss_history"]]
    assert len(history) == rec["steps"]
    assert rec["final_loss"] == pytest.approx(sum(history[-50:]) / len(history[-50:]), rel=1e-4)
    png = Image.open(out / rec["loss_curve"]).convert("RGB")
    assert png.size == (720, 420)
    colours = {c for _, c in png.getcolors(1 << 20)}
    assert (20, 40, 160) in colours  # the smoothed curve is drawn
    return rec


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_world_tiny")
    logs = {"vae": run_command("training.train_vae", out, "--steps", "40"),
            "clip": run_command("training.train_clip", out),
            "unet": run_command("training.train_unet", out, "--train-text-encoder", "--min-snr", "5",
                                "--lr-schedule", "cosine")}
    return out, logs


def test_train_vae_tiny(trained_tiny, pack_module):
    out, logs = trained_tiny
    assert "[vae] step 1/" in logs["vae"] and "[vae] done" in logs["vae"]
    rec = check_record(out, "vae")
    # 40 steps on a tiny batch: the reconstruction loss falls (the first steps are ~1.0 at init)
    history = [v for _, v in rec["loss_history"]]
    assert sum(history[-10:]) / 10 < 0.9 * sum(history[:10]) / 10, history
    models, world = pack_module("nodes.shapes_world.models"), pack_module("nodes.shapes_world.world")
    assert rec["ddconfig"] == models.VAE_DDCONFIG
    vae = models.build_vae(models.load_weights(out / models.VAE_FILE), ddconfig=rec["ddconfig"])
    # the record's scale factor is 1 / the std of the saved weights' posterior means on the held-out scenes
    images, _ = world.batch(range(world.HELD_OUT_SEED_START, world.HELD_OUT_SEED_START + 4))
    with torch.no_grad():
        z = vae.encode(torch.from_numpy(images).float() / 255)
    assert z.shape == (4, 4, 16, 16)
    assert rec["scale_factor"] == pytest.approx(1.0 / float(z.std()), rel=0.02)


def test_train_clip_tiny(trained_tiny, pack_module):
    out, logs = trained_tiny
    assert "[clip] done" in logs["clip"]
    rec = check_record(out, "clip")
    models, world = pack_module("nodes.shapes_world.models"), pack_module("nodes.shapes_world.world")
    sd = models.load_weights(out / models.CLIP_FILE)
    oc = models.build_open_clip(sd)
    assert torch.equal(oc.token_embedding.weight, sd["token_embedding.weight"])
    # the recorded retrieval is what the saved weights give on the 4 held-out scenes
    mc = models.ShapesWorldCLIP(oc)
    seeds = range(world.HELD_OUT_SEED_START, world.HELD_OUT_SEED_START + 4)
    images, captions = world.batch(seeds)
    with torch.no_grad():
        sim = mc.encode_image(torch.from_numpy(images).float() / 255) @ mc.encode_text(captions).T
    top1 = float((sim.argmax(1) == torch.arange(4)).float().mean())
    assert rec["heldout_retrieval"]["n"] == 4
    assert rec["heldout_retrieval"]["image_to_text_top1"] == pytest.approx(top1)


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
    # the jointly trained text tower is what CLIPTextEncode uses: the loader's CLIP gives the
    # tower's own output for the same tokens, and it differs from the dual encoder's text tower
    assert rec["text_encoder"].startswith(models.TEXT_ENCODER_FILE)
    train_unet = training_module("train_unet")
    oc = models.build_open_clip(models.load_weights(out / models.CLIP_FILE))
    dual = train_unet.TextTower(models.build_open_clip(models.load_weights(out / models.CLIP_FILE)))
    oc.load_state_dict(models.load_weights(out / models.TEXT_ENCODER_FILE), strict=False)
    tower = train_unet.TextTower(oc)
    text = "a red circle to the left of a small blue square"
    tokens = bundle["clip"].tokenize(text)
    ids = torch.tensor([[t[0] for t in tokens["l"][0]]])
    with torch.no_grad():
        cond = bundle["clip"].encode_from_tokens_scheduled(tokens)[0][0]
        assert (cond.float() - tower(ids)).abs().max() < 1e-4
        assert (cond.float() - dual(ids)).abs().max() > 1e-4


def test_training_schedule_is_comfyui_sd1(pack_module):
    """diffusers' scaled-linear DDPM schedule used for noising = ComfyUI's SD1 discrete sigmas."""
    from diffusers import DDPMScheduler
    models = pack_module("nodes.shapes_world.models")
    s = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ours = ((1 - s.alphas_cumprod) / s.alphas_cumprod).sqrt().float()
    comfy = models.build_base_model().model_sampling.sigmas.float()
    assert torch.allclose(ours, comfy, rtol=1e-4)
    assert not torch.allclose(ours, torch.linspace(float(ours[0]), float(ours[-1]), 1000), rtol=1e-2)


training_module = comfy_harness.training_module


def test_loss_curve_drawing(tmp_path):
    """The pillow loss plot: a falling loss is drawn falling (smoothed line's right end lower)."""
    save_loss_curve = training_module("common").save_loss_curve
    from PIL import Image
    save_loss_curve([(i, 1.0 / i) for i in range(1, 400)], tmp_path / "c.png")
    img = Image.open(tmp_path / "c.png").convert("RGB")
    px = img.load()
    dark = [(x, y) for x in range(img.width) for y in range(img.height) if px[x, y] == (20, 40, 160)]
    left = [y for x, y in dark if x < 150]
    right = [y for x, y in dark if x > 600]
    assert left and right and min(right) > max(left) - 5  # y grows downward: lower loss is drawn lower


def test_min_snr_weights_by_hand():
    """min(SNR, gamma) / SNR for eps-prediction, with SNR = abar / (1 - abar)."""
    train_unet = training_module("train_unet")
    abar = torch.tensor([0.999, 0.9, 0.5, 0.1, 0.001])
    t = torch.arange(5)
    w = train_unet.min_snr_weights(abar, t, 5.0)
    snr = [0.999 / 0.001, 9.0, 1.0, 0.1 / 0.9, 0.001 / 0.999]
    expected = [min(s, 5.0) / s for s in snr]
    assert torch.allclose(w, torch.tensor(expected), rtol=1e-4)
    assert torch.equal(train_unet.min_snr_weights(abar, t, 0.0), torch.ones(5))


def test_learning_rate_schedule():
    """Linear warmup, then constant, or cosine from 1 down to 0.1 at the last step."""
    common = training_module("common")

    class FakeRun:  # only the step counter and the budget are read
        def __init__(self, step):
            self.step, self.args = step, type("A", (), {"steps": 1100, "minutes": 0.0})()

        def elapsed(self):
            return 0.0

    f = lambda step, sched: common.lr_factor(FakeRun(step), 100, sched)
    assert f(0, "cosine") == pytest.approx(0.01) and f(49, "cosine") == pytest.approx(0.5)
    assert f(100, "constant") == f(1099, "constant") == 1.0
    assert f(100, "cosine") == pytest.approx(1.0) and f(600, "cosine") == pytest.approx(0.55)
    assert f(1100, "cosine") == pytest.approx(0.1)


def test_make_dataset_matches_the_world_and_comfyui_tokens(tmp_path, pack_module):
    """The pre-rendered set holds the generator's own scenes for its seeds, and each caption's
    token ids exactly as ComfyUI's SD1 tokenizer (what CLIPTextEncode uses) gives them."""
    import numpy as np
    env = dict(os.environ, MC_COMFYUI=str(comfy_harness.COMFY_DIR))
    cmd = [sys.executable, "-m", "training.make_dataset", "--n", "24", "--first-seed", "1000", "--workers", "1",
           "--chunk", "12", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=comfy_harness.PACK_DIR, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    common = training_module("common")
    scenes = common.SceneSet(tmp_path)
    world = pack_module("nodes.shapes_world.world")
    import comfy.sd1_clip
    tokenizer = comfy.sd1_clip.SD1Tokenizer()
    for i in range(24):
        scene = world.generate(1000 + i)
        assert scenes.seeds[i] == 1000 + i and scenes.captions[i] == scene.caption
        assert np.array_equal(scenes.images[i], scene.image)
        comfy_ids = [t[0] for t in tokenizer.tokenize_with_weights(scene.caption)["l"][0]]
        assert scenes.tokens[i].tolist() == comfy_ids, scene.caption


def test_scene_set_latents_are_cached_and_resumed(tmp_path):
    """A single process keeps the encoded latents beside the set: a second run encodes nothing and
    gets the same latents; a run stopped mid-way encodes only the missing chunks; another key
    (another VAE) encodes afresh; without a key nothing is written."""
    import numpy as np
    common = training_module("common")
    n = 10
    rng = np.random.default_rng(0)
    np.save(tmp_path / "images.npy", rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8))
    np.save(tmp_path / "tokens.npy", np.zeros((n, 77), dtype=np.int32))
    np.save(tmp_path / "seeds.npy", np.arange(n))
    (tmp_path / "captions.json").write_text(json.dumps([f"scene {i}" for i in range(n)]))
    calls = []

    def encode(x):  # a stand-in VAE: the mean colour per image, as a (B, 3, 1, 1) "latent"
        calls.append(len(x))
        return x.mean(dim=(2, 3), keepdim=True)

    scenes = common.SceneSet(tmp_path)
    first = scenes.encoded(encode, "vaeA", chunk=4, log=lambda *_: None)
    assert calls == [4, 4, 2] and first.dtype == torch.float16 and first.shape == (n, 3, 1, 1)
    expected = torch.from_numpy(np.load(tmp_path / "images.npy")).float().div(255).mean(dim=(1, 2)).half()
    assert torch.equal(first[:, :, 0, 0], expected)
    calls.clear()
    assert torch.equal(scenes.encoded(encode, "vaeA", chunk=4, log=lambda *_: None), first) and calls == []
    (tmp_path / "latents-vaeA" / "00001-4.npy").unlink()  # as if stopped while encoding the second chunk
    assert torch.equal(scenes.encoded(encode, "vaeA", chunk=4, log=lambda *_: None), first) and calls == [4]
    calls.clear()
    scenes.encoded(encode, "vaeB", chunk=4, log=lambda *_: None)
    assert calls == [4, 4, 2]
    calls.clear()
    scenes.encoded(encode, None, chunk=4, log=lambda *_: None)
    assert calls == [4, 4, 2] and sorted(p.name for p in tmp_path.glob("latents-*")) == ["latents-vaeA", "latents-vaeB"]


def test_caption_and_draw_options_by_hand(pack_module):
    """--colourless drops exactly the colour words (sizes, shapes, relations and backgrounds stay);
    --object-count-weights reads "count:weight" pairs."""
    train_unet = training_module("train_unet")
    colours = pack_module("nodes.shapes_world.world").COLOURS
    assert train_unet.without_colours("a small red circle to the left of a blue square on a striped background",
                                      colours) == "a small circle to the left of a square on a striped background"
    assert train_unet.without_colours("a red circle, a green triangle and a big purple square", colours) == \
        "a circle, a triangle and a big square"
    assert train_unet.parse_count_weights("1:1.5, 2:2") == {1: 1.5, 2: 2.0}
    assert train_unet.parse_count_weights("") == {}
    with pytest.raises(ValueError, match="object-count-weights"):
        train_unet.parse_count_weights("2:-1")


def test_train_unet_on_a_scene_set_with_count_weights(tmp_path):
    """The dataset path with both options: a weight of 0 for every count but two leaves only
    two-object scenes to draw, which the run reports and records."""
    scenes = tmp_path / "scenes"
    env = dict(os.environ, MC_COMFYUI=str(comfy_harness.COMFY_DIR))
    cmd = [sys.executable, "-m", "training.make_dataset", "--n", "24", "--workers", "1", "--out", str(scenes)]
    proc = subprocess.run(cmd, cwd=comfy_harness.PACK_DIR, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    log = run_command("training.train_unet", out, "--dataset", str(scenes), "--train-text-encoder",
                      "--sample-prompts", "0", "--object-count-weights", "1:0,3:0,4:0", "--colourless", "0.5")
    assert "[unet] draw share by object count: 1: 0%, 2: 100%, 3: 0%, 4: 0%" in log, log[-2000:]
    rec = json.loads((out / "unet.json").read_text())
    assert rec["object_count_weights"] == "1:0,3:0,4:0" and rec["colourless_share"] == 0.5
