"""The segfree_sd3 / segfree_flux workflows on model files that ComfyUI's own loaders read by name.

scripts/dit_test_models.py writes random-weight files under the names the workflows load (the names
of users' files) and links them into the test server's models folder. Checked here:
  * ComfyUI's detectors take them for what they claim (SD3 checkpoint with CLIP-L/G and a 16-channel
    VAE; Flux-dev UNet, CLIP-L, T5-XXL, 16-channel VAE), read from the file headers only;
  * each workflow runs from the frontend's Run button code path in the real server;
  * in those graphs, start_percent 1.0 gives the very pixels of the same graph without the node, and
    the default switch changes them (the edit reached the model the loader loaded).
test_server.py runs both workflows too, like every workflow.
"""
from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import comfy_harness
import dit_test_models  # scripts/ (conftest puts it on sys.path)

WORKFLOWS = comfy_harness.PACK_DIR / "workflows"


@pytest.fixture(scope="module")
def models_dir(comfy_server):
    models = comfy_server.base / "models"
    dit_test_models.install(models, ("sd3", "flux"))
    return models


def header_state_dict(path) -> dict:
    """The file's tensors as meta tensors (names, shapes, dtypes), without reading the weights."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            piece = f.get_slice(key)
            dtype = getattr(torch, {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
                                    "I64": "int64"}[piece.get_dtype()])
            out[key] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
    return out


def test_comfyui_detects_the_files(models_dir, comfy_nodes):
    import comfy.model_detection
    import comfy.sd
    import comfy.supported_models

    sd3 = header_state_dict(models_dir / "checkpoints" / "sd3_medium_incl_clips.safetensors")
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd3)
    config = comfy.model_detection.model_config_from_unet(sd3, prefix)
    assert type(config) is comfy.supported_models.SD3 and prefix == "model.diffusion_model."
    assert config.unet_config["context_embedder_config"]["params"]["in_features"] == 4096
    assert config.unet_config["adm_in_channels"] == 2048  # CLIP-L 768 + CLIP-G 1280 pooled
    te = config.clip_target(sd3).clip
    probe = te.__mro__[1] if te.__name__.endswith("_") else te
    assert probe.__name__ == "SD3ClipModel"
    for part in ("clip_l", "clip_g"):
        assert f"text_encoders.{part}.transformer.text_model.final_layer_norm.weight" in sd3
    assert not any(k.startswith("text_encoders.t5xxl") for k in sd3)  # as sd3_medium_incl_clips: no T5
    assert sd3["first_stage_model.decoder.conv_in.weight"].shape[1] == 16

    flux = header_state_dict(models_dir / "diffusion_models" / "flux1-dev.safetensors")
    config = comfy.model_detection.model_config_from_unet(flux, "")
    assert type(config) is comfy.supported_models.Flux and config.unet_config["guidance_embed"]
    assert (config.unet_config["context_in_dim"], config.unet_config["vec_in_dim"]) == (4096, 768)
    t5 = header_state_dict(models_dir / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors")
    assert comfy.sd.detect_te_model(t5) == comfy.sd.TEModel.T5_XXL
    assert t5["encoder.final_layer_norm.weight"].dtype == torch.float8_e4m3fn  # ComfyUI keeps the model in float8
    assert comfy.sd.detect_te_model(header_state_dict(models_dir / "text_encoders" / "clip_l.safetensors")) == comfy.sd.TEModel.CLIP_L
    assert header_state_dict(models_dir / "vae" / "ae.safetensors")["decoder.conv_in.weight"].shape[1] == 16


def pixels(entry_images, node_id: str) -> np.ndarray:
    (data,) = [data for nid, _, data in entry_images if nid == node_id]
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def run_api(comfy_server, api: dict) -> list:
    return comfy_server.output_images(comfy_server.run_api_prompt(api))


# name: (SFG node, loader output feeding its model input, SaveImage node, nodes only the showcase needs)
GRAPHS = {"segfree_sd3": ("2", ["1", 0], "8", ("9", "10")), "segfree_flux": ("4", ["1", 0], "11", ())}


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_workflow_runs_from_the_run_button(name, models_dir, comfy_server, comfy_page, artifacts, say):
    workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
    comfy_page.load_workflow(workflow, name)
    entry = comfy_server.wait_history(comfy_page.queue(), timeout=900)
    assert entry["status"]["status_str"] == "success"
    images = comfy_server.output_images(entry)
    image = pixels(images, GRAPHS[name][2])
    assert image.std() > 0, "the decoded image is one flat colour"
    for nid, record, data in images:
        (artifacts / f"dit-{name}-{record['filename']}").write_bytes(data)
    say(f"{name}: run from the page, images {[r['filename'] for _, r, _ in images]}")
    assert not comfy_page.pack_errors()


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_switch_at_one_is_plain_sampling(name, models_dir, comfy_server, say):
    """start_percent 1.0: the same pixels as the graph without the node; the default switch: others.
    The text encoders stay wired to the workflow's own node, so ComfyUI's cache re-runs only sampling."""
    sfg, loader_model, save, extras = GRAPHS[name]
    source = json.loads((WORKFLOWS / "src" / f"{name}.api.json").read_text())
    for nid in extras:
        source.pop(nid)
    sampler = next(nid for nid, n in source.items() if n["class_type"] == "KSampler")
    source[sampler]["inputs"]["steps"] = 4  # the switch still falls inside the schedule; Flux steps cost seconds

    def variant(start_percent):
        api = copy.deepcopy(source)
        if start_percent is None:
            api[sampler]["inputs"]["model"] = loader_model  # plain: the loader's MODEL straight into the KSampler
        else:
            api["99"] = copy.deepcopy(api[sfg])
            api["99"]["inputs"]["start_percent"] = start_percent
            api[sampler]["inputs"]["model"] = ["99", 0]
        return pixels(run_api(comfy_server, api), save)

    plain, never, default = variant(None), variant(1.0), variant(source[sfg]["inputs"]["start_percent"])
    assert np.array_equal(never, plain), "start_percent 1.0 changed the image"
    changed = np.abs(default - plain)
    say(f"{name}: start_percent 1.0 == plain; the default switch changes {np.mean(changed > 0):.0%} of the values, "
        f"by {changed.mean():.2f} levels on average (max {changed.max()})")
    # Bit-identity at 1.0 leaves the edit as the only difference: any change shows it reached the loaded
    # model. Its size depends on the random weights (one 3072-wide Flux block moves ~0.1 level on average).
    assert changed.max() >= 1 and np.mean(changed > 0) > 0.01
