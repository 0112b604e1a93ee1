"""The pack's CLIP loader (MC_CLIP): open_clip weights from the pack's models folder, ComfyUI's own
CLIP_VISION + CLIP pair, and ranking with either. Nothing is downloaded: the weights are a tiny
open_clip model this test builds and writes."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch

import tiny_models

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 32, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def clip_models(pack_module):
    return pack_module("nodes.clip_models")


@pytest.fixture(scope="module")
def tiny_open_clip(clip_models):
    """A seeded tiny open_clip CLIP written as models/more_control_clip/mc_test_tiny_clip.safetensors with
    its config beside it, and the same weights once more without a config (for the architecture-name path)."""
    import folder_paths
    import open_clip
    from safetensors.torch import save_file

    folder = pathlib.Path(folder_paths.get_folder_paths(clip_models.FOLDER_NAME)[0])
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CONFIG).eval()
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "mc_test_tiny_clip.safetensors"))
    (folder / "mc_test_tiny_clip.json").write_text(json.dumps(TINY_CONFIG))
    save_file(state, str(folder / "weights_only.safetensors"))
    # the architecture-name path needs a name open_clip knows: register the same config under another name
    arch = folder.parent / "mc_test_arch.json"
    arch.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(arch)
    return model


def test_loads_a_local_file_with_its_config(clip_models, tiny_open_clip):
    (mc_clip,) = clip_models.CLIPLoader.execute("ViT-B-16", "", "mc_test_tiny_clip.safetensors", False, "cpu").result
    assert clip_models.is_mc_clip(mc_clip) and mc_clip.image_size == 64 and len(mc_clip.mean) == 3
    images = torch.rand(3, 40, 50, 3, generator=torch.Generator().manual_seed(1))
    feats = mc_clip.encode_image(images)
    text = mc_clip.encode_text(["a red ball", "a blue square"])
    assert feats.shape == (3, 32) and text.shape == (2, 32)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)
    # the written weights were loaded, not a fresh random init: same features as the original model
    import open_clip

    with torch.no_grad():
        reference = tiny_open_clip.encode_text(open_clip.get_tokenizer("mc_test_tiny_clip")(["a red ball"]))
    assert torch.allclose(text[0], torch.nn.functional.normalize(reference, dim=-1)[0], atol=1e-5)
    # encode_image is differentiable (semantic guidance takes gradients through it)
    x = images.clone().requires_grad_(True)
    (mc_clip.encode_image(x) @ text[0]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_loads_an_architecture_name_with_a_weights_file(clip_models, tiny_open_clip):
    (mc_clip,) = clip_models.CLIPLoader.execute("mc_test_arch", "", "weights_only.safetensors", False, "cpu").result
    (same,) = clip_models.CLIPLoader.execute("ViT-B-16", "", "mc_test_tiny_clip.safetensors", False, "cpu").result
    assert torch.allclose(mc_clip.encode_text(["x"]), same.encode_text(["x"]), atol=1e-6)


def test_loader_errors_name_the_input(clip_models, glue, tiny_open_clip, monkeypatch):
    with pytest.raises(glue.NodeInputError, match="MC_CLIPLoader: input 'architecture': 'NoSuchNet' is not"):
        clip_models.CLIPLoader.execute("NoSuchNet", "openai", "none", False, "cpu")
    with pytest.raises(glue.NodeInputError, match="MC_CLIPLoader: input 'weights_file'"):
        clip_models.CLIPLoader.execute("RN50", "", "missing.safetensors", False, "cpu")
    # a real tag that is not cached: with allow_download off no connection is even attempted (every name
    # lookup and connect of this process is recorded and refused), and the error names the input
    import socket

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("a network connection in a test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    with pytest.raises(glue.NodeInputError, match="MC_CLIPLoader: input 'pretrained'.*local cache"):
        clip_models.CLIPLoader.execute("RN50", "openai", "none", False, "cpu")
    assert attempts == []


def test_comfy_clip_vision_and_text_encoder_pair(clip_models, glue, tiny_clip, tmp_path):
    """ComfyUI's CLIP_VISION + a CLIP text encoder of the same width work as an MC_CLIP."""
    vision = tiny_models.tiny_clip_vision(tmp_path)
    (mc_clip,) = clip_models.CLIPFromComfy.execute(vision, tiny_clip).result
    images = torch.rand(2, 48, 40, 3, generator=torch.Generator().manual_seed(6))
    feats = mc_clip.encode_image(images)
    text = mc_clip.encode_text(["a red ball", "a blue square"])
    assert feats.shape == (2, 768) and text.shape == (2, 768)
    # the text features are the CLIP's own pooled outputs, normalised, one per prompt in order
    for i, prompt in enumerate(["a red ball", "a blue square"]):
        _, pooled = tiny_clip.encode_from_tokens(tiny_clip.tokenize(prompt), return_pooled=True)
        assert torch.allclose(text[i], torch.nn.functional.normalize(pooled.float().reshape(-1), dim=0), atol=1e-5)
    assert (text[0] - text[1]).abs().max() > 1e-3
    # the image features are CLIP_VISION's image embeddings (its own preprocessing and crop), normalised
    embeds = vision.encode_image(images, crop=True)["image_embeds"].float()
    assert torch.allclose(feats, torch.nn.functional.normalize(embeds, dim=-1), atol=1e-5)
    # the error that exists for the pair's inputs: something that is not a CLIP vision model
    with pytest.raises(glue.NodeInputError, match="MC_CLIPFromComfy: input 'clip_vision': is not a CLIP vision model"):
        clip_models.CLIPFromComfy.execute(tiny_clip, tiny_clip)


def test_rank_by_clip_with_an_open_clip_model(clip_models, tiny_open_clip, pack_module):
    blended = pack_module("nodes.blended")
    (mc_clip,) = clip_models.CLIPLoader.execute("ViT-B-16", "", "mc_test_tiny_clip.safetensors", False, "cpu").result
    images = torch.rand(5, 48, 48, 3, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 48, 48)
    mask[:, 8:40, 8:40] = 1
    latent = {"samples": torch.arange(5.0).reshape(5, 1, 1, 1).expand(5, 4, 6, 6).clone()}
    out_images, out_latent, scores = blended.RankByCLIP.execute(mc_clip, images, latent, mask, "a red ball", 0, 0.5).result
    with torch.no_grad():
        sims = (mc_clip.encode_image(images * mask[..., None]) @ mc_clip.encode_text(["a red ball"])[0])
    expected = torch.argsort(-sims).tolist()
    assert [int(v) for v in out_latent["samples"][:, 0, 0, 0]] == expected
    assert torch.equal(out_images, images[expected])
    assert scores.splitlines()[0].startswith(f"1. image {expected[0]}:")


def test_comfy_pair_of_different_embedding_sizes_is_refused(clip_models, glue, tiny_clip, tmp_path):
    """An image tower and a text encoder of different embedding sizes are not one CLIP: refused at the
    node, naming both inputs, instead of a shape error later in ranking or guidance."""
    vision = tiny_models.tiny_clip_vision(tmp_path, projection_dim=512)
    with pytest.raises(glue.NodeInputError, match=r"MC_CLIPFromComfy: input 'clip': the text encoder gives 768-wide "
                                                  r"embeddings but the image tower \(input 'clip_vision'\) gives 512-wide"):
        clip_models.CLIPFromComfy.execute(vision, tiny_clip)
