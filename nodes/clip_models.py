"""The pack's one CLIP loader (type MC_CLIP), shared by CLIP ranking and semantic guidance.

An MC_CLIP is any object with this interface (duck typing; the shapes-world dual encoder has it too):

    encode_image(images)  images BHWC in [0, 1] -> [B, D] L2-normalised features (differentiable:
                          callers decide whether gradients flow)
    encode_text(prompts)  list[str] -> [N, D] L2-normalised features
    image_size            the square input side the image tower expects
    mean, std             the per-channel normalisation the image tower expects (3 floats each)

Sources:
  * open_clip: an architecture name with a pretrained tag (e.g. ViT-B-16 / openai), from the local
    cache; downloading is off unless the user allows it on the node;
  * a local weights file (.safetensors/.pt/.bin) in `models/more_control_clip/` (registered here with
    folder_paths), for an open_clip architecture; a `<name>.json` open_clip model config beside the
    file defines a custom architecture;
  * ComfyUI's own CLIP_VISION with a CLIP text encoder of the same embedding space (MC_CLIPFromComfy).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib

import torch
import torch.nn.functional as F

import folder_paths
from comfy_api.v0_0_2 import io

from .glue import NodeInputError

FOLDER_NAME = "more_control_clip"
WEIGHT_EXTENSIONS = {".safetensors", ".pt", ".pth", ".bin"}
folder_paths.add_model_folder_path(FOLDER_NAME, os.path.join(folder_paths.models_dir, FOLDER_NAME))
# add_model_folder_path registers an empty extension filter (= every file): list weights only.
folder_paths.folder_names_and_paths[FOLDER_NAME] = (folder_paths.folder_names_and_paths[FOLDER_NAME][0], WEIGHT_EXTENSIONS)

MCClip = io.Custom("MC_CLIP")

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def is_mc_clip(obj) -> bool:
    """True for anything usable as an MC_CLIP (the interface above)."""
    return all(callable(getattr(obj, name, None)) for name in ("encode_image", "encode_text"))


def preprocess(images: torch.Tensor, image_size: int, mean, std) -> torch.Tensor:
    """BHWC in [0, 1] -> BCHW normalised at image_size x image_size: resize the short side, centre
    crop (CLIP's own preprocessing), differentiably (no 8-bit rounding)."""
    x = images[..., :3].movedim(-1, 1).float()
    h, w = x.shape[-2:]
    if (h, w) != (image_size, image_size):
        scale = image_size / min(h, w)
        size = (max(image_size, round(h * scale)), max(image_size, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = (x.shape[-2] - image_size) // 2, (x.shape[-1] - image_size) // 2
        x = x[..., top:top + image_size, left:left + image_size]
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


class OpenCLIPModel:
    """An open_clip CLIP with its tokenizer, as an MC_CLIP."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str, mean=OPENAI_MEAN, std=OPENAI_STD, device="cpu"):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device)
        visual = getattr(model, "visual", None)
        size = getattr(visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean, self.std = tuple(mean), tuple(std)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        pixels = preprocess(images.to(self.device), self.image_size, self.mean, self.std)
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def __repr__(self):
        return f"OpenCLIPModel({self.name}, image_size={self.image_size})"


class ComfyCLIPPair:
    """ComfyUI's CLIP_VISION (image tower) with a ComfyUI CLIP text encoder, as an MC_CLIP.

    The two must share an embedding space: e.g. clip_vision ViT-L/14 with a CLIP-L text encoder file
    that carries its text projection (as shipped for SD3/Flux). SD1.5 checkpoints carry no text
    projection, so their pooled output is not in the image space. encode_image goes through
    ComfyUI's own preprocessing, which rounds to 8 bits: use it for ranking, not for gradients."""

    def __init__(self, clip_vision, clip):
        self.clip_vision, self.clip = clip_vision, clip
        self.image_size = int(getattr(clip_vision, "image_size", 224))
        self.mean = tuple(getattr(clip_vision, "image_mean", OPENAI_MEAN))
        self.std = tuple(getattr(clip_vision, "image_std", OPENAI_STD))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip_vision.encode_image(images, crop=True)["image_embeds"].float(), dim=-1)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        pooled = []
        for prompt in prompts:
            _, p = self.clip.encode_from_tokens(self.clip.tokenize(prompt), return_pooled=True)
            pooled.append(p.float().reshape(1, -1))
        return F.normalize(torch.cat(pooled), dim=-1)


@contextlib.contextmanager
def hub_offline(offline: bool):
    """Make huggingface_hub (which open_clip downloads through) use its local cache only."""
    if not offline:
        yield
        return
    try:
        import huggingface_hub.constants as hub_constants
    except ImportError:
        yield
        return
    before = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = before


def load_open_clip(architecture: str, pretrained: str | None, weights_path: str | None, device: str,
                   allow_download: bool = False) -> OpenCLIPModel:
    """Build an open_clip model. `weights_path` (a local file) wins over `pretrained` (a tag); a
    `<stem>.json` beside the file is an open_clip model config naming a custom architecture."""
    import open_clip

    if weights_path:
        config = pathlib.Path(weights_path).with_suffix(".json")
        if config.is_file():
            open_clip.add_model_config(config)
            architecture = config.stem
    with hub_offline(not allow_download):
        model, _, preprocess_val = open_clip.create_model_and_transforms(
            architecture, pretrained=weights_path or pretrained or None, device=device)
    tokenizer = open_clip.get_tokenizer(architecture)
    mean, std = OPENAI_MEAN, OPENAI_STD
    cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None) or {}
    mean, std = cfg.get("mean", mean), cfg.get("std", std)
    return OpenCLIPModel(model, tokenizer, f"{architecture}/{os.path.basename(weights_path) if weights_path else pretrained}",
                         mean, std, device)


class CLIPLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MC_CLIPLoader",
            display_name="CLIP Loader (More Control)",
            category="More Control/loaders",
            description="Loads an open_clip CLIP model for ranking edits and semantic guidance.",
            inputs=[
                io.String.Input("architecture", default="ViT-B-16",
                                tooltip="open_clip architecture name (e.g. ViT-B-16, ViT-L-14, RN50). Ignored when the weights file "
                                        "has a <name>.json open_clip config beside it."),
                io.String.Input("pretrained", default="openai",
                                tooltip="open_clip pretrained tag (e.g. openai, laion2b_s34b_b88k), read from the local cache. "
                                        "Used when weights_file is 'none'."),
                io.Combo.Input("weights_file", options=["none"] + folder_paths.get_filename_list(FOLDER_NAME), default="none",
                               tooltip="A local weights file from models/more_control_clip/ (wins over the pretrained tag)."),
                io.Boolean.Input("allow_download", default=False,
                                 tooltip="Let open_clip download the pretrained tag's weights when they are not cached. "
                                         "Off: only local files are used."),
                io.Combo.Input("device", options=["auto", "cpu"], default="auto",
                               tooltip="auto: ComfyUI's torch device; cpu saves GPU memory at the cost of speed."),
            ],
            outputs=[MCClip.Output(display_name="mc_clip")],
        )

    @classmethod
    def execute(cls, architecture, pretrained, weights_file, allow_download, device) -> io.NodeOutput:
        import comfy.model_management
        import open_clip

        node = "MC_CLIPLoader"
        weights_path = None
        if weights_file != "none":
            weights_path = folder_paths.get_full_path(FOLDER_NAME, weights_file)
            if weights_path is None:
                raise NodeInputError(node, "weights_file", f"{weights_file!r} is not in models/{FOLDER_NAME}/")
        has_config = weights_path is not None and pathlib.Path(weights_path).with_suffix(".json").is_file()
        if not has_config and architecture not in open_clip.list_models():
            raise NodeInputError(node, "architecture", f"{architecture!r} is not an open_clip architecture "
                                 f"(e.g. {', '.join(sorted(open_clip.list_models())[:6])}, ...)")
        if weights_path is None and not pretrained.strip():
            raise NodeInputError(node, "pretrained", "give a pretrained tag or choose a weights_file")
        torch_device = comfy.model_management.get_torch_device() if device == "auto" else torch.device("cpu")
        try:
            with torch.inference_mode(False):
                mc_clip = load_open_clip(architecture, pretrained.strip(), weights_path, torch_device, allow_download)
        except RuntimeError as e:
            where = "weights_file" if weights_path else "pretrained"
            hint = "" if allow_download or weights_path else (
                " (not in the local cache: put a weights file in models/more_control_clip/ or allow the download)")
            raise NodeInputError(node, where, f"open_clip could not load {architecture}: {e}{hint}") from None
        logging.info("[More Control] loaded %r", mc_clip)
        return io.NodeOutput(mc_clip)


class CLIPFromComfy(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MC_CLIPFromComfy",
            display_name="CLIP from ComfyUI models (More Control)",
            category="More Control/loaders",
            description="Pairs a CLIP_VISION image encoder with a CLIP text encoder of the same embedding space as an MC_CLIP.",
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="The image tower (Load CLIP Vision), e.g. a ViT-L/14 CLIP vision model."),
                io.Clip.Input("clip", tooltip="A text encoder of the same CLIP model, with its text projection (e.g. clip_l.safetensors)."),
            ],
            outputs=[MCClip.Output(display_name="mc_clip")],
        )

    @classmethod
    def execute(cls, clip_vision, clip) -> io.NodeOutput:
        if not hasattr(clip_vision, "encode_image"):
            raise NodeInputError("MC_CLIPFromComfy", "clip_vision", "is not a CLIP vision model")
        return io.NodeOutput(ComfyCLIPPair(clip_vision, clip))


NODES = [CLIPLoader, CLIPFromComfy]
