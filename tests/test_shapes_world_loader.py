"""MC_ShapesWorldLoader through ComfyUI's own loader and executor, with ComfyUI's standard nodes."""
import torch


def t2i_prompt(weights="trained", steps=2, text="a red circle to the left of a small blue square"):
    return {
        "1": {"class_type": "MC_ShapesWorldLoader", "inputs": {"weights": weights, "seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 1, "steps": steps, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


def test_loader_registered(comfy_nodes):
    import nodes
    cls = nodes.NODE_CLASS_MAPPINGS["MC_ShapesWorldLoader"]
    info = cls.INPUT_TYPES()
    weights = info["required"]["weights"]
    options = weights[0] if isinstance(weights[0], list) else weights[1]["options"]
    assert options == ["trained", "random (untrained)"]
    assert list(cls.RETURN_TYPES) == ["MODEL", "CLIP", "VAE", "MC_CLIP", "STRING"]
    for name, spec in info["required"].items():
        assert spec[1].get("tooltip"), f"input {name} has no tooltip"


def test_random_weights_workflow_runs(run_prompt, comfy_nodes, pack_module):
    """The standard text-to-image graph (CLIPTextEncode, EmptyLatentImage 128x128, KSampler,
    VAEDecode) runs on the loader's models and shows what those nodes give when called directly
    with the same models (up to PNG rounding)."""
    import os

    import folder_paths
    import numpy as np
    from PIL import Image

    prompt = t2i_prompt("random (untrained)")
    out = run_prompt(prompt)
    (entry,) = out["7"]["images"]
    shown = np.asarray(Image.open(os.path.join(folder_paths.get_directory_by_type(entry["type"]), entry["subfolder"],
                                               entry["filename"])).convert("RGB")).astype(int)
    bundle = pack_module("nodes.shapes_world_loader").load("random (untrained)", 0)
    clip, sampler = bundle["clip"], prompt["5"]["inputs"]
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        encode = lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text))
        (latent,) = comfy_nodes.common_ksampler(bundle["model"], sampler["seed"], sampler["steps"], sampler["cfg"], "euler", "normal",
                                                encode(prompt["2"]["inputs"]["text"]), encode(""),
                                                {"samples": torch.zeros(1, 4, 16, 16)}, denoise=1.0)
        image = bundle["vae"].decode(latent["samples"])[0]
    want = np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8).astype(int)
    assert shown.shape == want.shape == (128, 128, 3) and np.abs(shown - want).max() <= 1
    assert shown.std() > 0


def test_loader_outputs_shapes(pack_module, caplog):
    loader = pack_module("nodes.shapes_world_loader")
    import logging
    with caplog.at_level(logging.WARNING):
        b = loader.load("random (untrained)", seed=3)
    assert "UNTRAINED random weights" in caplog.text
    assert not any(b["trained"].values())
    vae, clip, mc = b["vae"], b["clip"], b["mc_clip"]
    img = torch.rand(2, 128, 128, 3)
    lat = vae.encode(img)
    assert lat.shape == (2, 4, 16, 16)
    assert vae.decode(lat).shape[-3:] == (128, 128, 3)
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a green triangle"))
    assert cond[0][0].shape == (1, 77, 128)
    fi, ft = mc.encode_image(img), mc.encode_text(["a red circle", "a blue square"])
    assert fi.shape == ft.shape == (2, 128)
    assert torch.allclose(fi.norm(dim=-1), torch.ones(2), atol=1e-4)
    assert mc.image_size == 128
    # seeded: the same seed gives the same random weights, another seed different ones
    b2 = loader.models.load_bundle("random", seed=3)
    b3 = loader.models.load_bundle("random", seed=4)
    w = lambda bb: next(iter(bb["model"].model.diffusion_model.parameters())).detach()
    assert torch.equal(w(b), w(b2)) and not torch.equal(w(b), w(b3))


def test_text_tower_matches_comfy_encoder(pack_module):
    """open_clip's text tower and the converted ComfyUI CLIPTextModel give the same token embeddings."""
    models = pack_module("nodes.shapes_world.models")
    oc = models.build_open_clip(seed=5)
    clip = models.build_comfy_clip(oc)
    for text in ["a red circle to the left of a small blue square", "", "an orange triangle on a striped background"]:
        tokens = clip.tokenize(text)
        cond = clip.encode_from_tokens_scheduled(tokens)[0][0]
        ids = torch.tensor([[t[0] for t in tokens["l"][0]]])
        with torch.no_grad():
            ref = models.open_clip_token_embeddings(oc, ids)
        assert cond.shape == ref.shape == (1, 77, 128)
        diff = (cond.float() - ref).abs().max().item()
        print(f"{text!r}: max |open_clip - ComfyUI| = {diff:.2e}")
        assert diff < 1e-4
    # the open_clip tokenizer (pads with 0) and ComfyUI's SD1 tokenizer (pads with end) agree up to the end token
    oc_ids = open_clip_ids = models.ShapesWorldCLIP(oc).tokenize(["a red circle"])[0]
    comfy_ids = [t[0] for t in clip.tokenize("a red circle")["l"][0]]
    n = int((open_clip_ids != 0).sum())
    assert oc_ids[:n].tolist() == comfy_ids[:n]
