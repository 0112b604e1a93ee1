"""The pack's one CLIP loader (type MC_CLIP), shared by CLIP ranking and semantic guidance.

An MC_CLIP is any object with this interface (duck typing; the shapes-world dual encoder has it too):

    encode_image(images)  images BHWC in [0, 1] -> [B, D] L2-normalised features (differentiable:
                          callers decide whether gradients flow)
    encode_text(prompts)  list[str] -> [N, D] L2-normalised features
    image_size            the square input side the image tower expects
    mean, std             the per-channel normalisation the image tower expects (3 floats each)

and, for semantic guidance, spatial feature maps (module function `image_features`, which uses an
`image_features(images, layers)` method where the object has one and otherwise the open_clip image
tower at `.model.visual`, as the shapes-world dual encoder has):

    image_features(mc_clip, images, layers) -> ([B, D] L2-normalised embedding, [maps (B, C, H, W)])
        differentiable; `layers` index the tower's stages: ResNet 0 = stem, 1-4 = layer1-layer4;
        ViT (open_clip or ComfyUI's CLIP_VISION): transformer blocks, their token grid as a map
    feature_stages(mc_clip) -> how many stages `layers` may pick

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

from .algorithms import sdg as sdg_algo
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

    def __init__(self, model: torch.nn.Module, tokenizer, name: str, mean=OPENAI_MEAN, std=OPENAI_STD, device="cpu",
                 config: dict | None = None):
        self.model = model.eval().requires_grad_(False)
        self.config = config  # the open_clip model config (what a noise-aware copy of the tower is built from)
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

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return preprocess(images.to(self.device), self.image_size, self.mean, self.std)

    def image_features(self, images: torch.Tensor, layers: list[int]):
        embedding, maps = sdg_algo.tower_features(self.model.visual, self.preprocess(images), layers)
        return F.normalize(embedding.float(), dim=-1), [m.float() for m in maps]

    def feature_stages(self) -> int:
        return sdg_algo.stage_count(self.model.visual)

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

    def image_features(self, images: torch.Tensor, layers: list[int]):
        """Differentiable (no 8-bit rounding): our own preprocessing, ComfyUI's vision model with
        every block's tokens; a block's map is its patch tokens on the patch grid."""
        import comfy.model_management

        comfy.model_management.load_model_gpu(self.clip_vision.patcher)
        device = self.clip_vision.load_device
        pixels = preprocess(images.to(device), self.image_size, self.mean, self.std)
        from comfy.ldm.modules.attention import optimized_attention_for_device

        model = self.clip_vision.model
        vision = model.vision_model
        x = vision.pre_layrnorm(vision.embeddings(pixels.to(next(model.parameters()).dtype)))
        attention = optimized_attention_for_device(x.device, mask=False, small_input=True)
        maps = []
        # ComfyUI's CLIPLayer adds its residuals in place, which autograd cannot differentiate:
        # the same layers, called out of place.
        for i, layer in enumerate(vision.encoder.layers):
            x = x + layer.self_attn(layer.layer_norm1(x), None, attention)
            x = x + layer.mlp(layer.layer_norm2(x))
            if i in layers:
                tokens = x[:, 1:].float()  # the patch tokens, without the class token
                side = int(round(tokens.shape[1] ** 0.5))
                maps.append(tokens.reshape(tokens.shape[0], side, side, -1).permute(0, 3, 1, 2))
        pooled = vision.post_layernorm(x) if getattr(vision, "output_layernorm", False) else vision.post_layernorm(x[:, 0, :])
        embedding = model.visual_projection(pooled)
        return F.normalize(embedding.float(), dim=-1), maps

    def feature_stages(self) -> int:
        return len(self.clip_vision.model.vision_model.encoder.layers)

    def image_embed_dim(self) -> int:
        projection = getattr(self.clip_vision.model, "visual_projection", None)
        return int(projection.out_features) if hasattr(projection, "out_features") else \
            int(self.clip_vision.model.vision_model.post_layernorm.normalized_shape[0])

    def text_embed_dim(self) -> int:
        return int(self.encode_text([""]).shape[-1])


def _open_clip_visual(mc_clip):
    visual = getattr(getattr(mc_clip, "model", None), "visual", None)
    if visual is None:
        raise TypeError(f"{type(mc_clip).__name__} has no open_clip image tower and no image_features method")
    return visual


def image_features(mc_clip, images: torch.Tensor, layers: list[int]):
    """([B, D] L2-normalised embedding, [maps of `layers`]) of images BHWC in [0, 1], differentiable."""
    if callable(getattr(mc_clip, "image_features", None)):
        return mc_clip.image_features(images, layers)
    visual = _open_clip_visual(mc_clip)
    if callable(getattr(mc_clip, "preprocess", None)):
        pixels = mc_clip.preprocess(images)
    else:
        pixels = preprocess(images, mc_clip.image_size, mc_clip.mean, mc_clip.std)
    embedding, maps = sdg_algo.tower_features(visual, pixels, layers)
    return F.normalize(embedding.float(), dim=-1), [m.float() for m in maps]


def feature_stages(mc_clip) -> int:
    if callable(getattr(mc_clip, "feature_stages", None)):
        return mc_clip.feature_stages()
    return sdg_algo.stage_count(_open_clip_visual(mc_clip))


def default_feature_layers(mc_clip, purpose: str) -> list[int]:
    """Style: every stage of a ResNet; structure: its middle stages (see sdg.default_layers)."""
    visual = getattr(getattr(mc_clip, "model", None), "visual", None)
    if visual is not None:
        return sdg_algo.default_layers(visual, purpose)
    n = feature_stages(mc_clip)
    return sorted({n // 4, n // 2, (3 * n) // 4}) if purpose == "style" else sorted({n // 2, (3 * n) // 4})


def vision_config(mc_clip) -> dict:
    """What builds an empty copy of the MC_CLIP's image tower with open_clip ({"embed_dim",
    "vision_cfg", "quick_gelu"}): the loader's config, or read off a ModifiedResNet (the
    shapes-world dual encoder). Raises TypeError for towers open_clip cannot rebuild."""
    config = getattr(mc_clip, "config", None)
    if config:
        return {"embed_dim": config["embed_dim"], "vision_cfg": config["vision_cfg"], "quick_gelu": bool(config.get("quick_gelu", False))}
    visual = _open_clip_visual(mc_clip)
    if sdg_algo.tower_kind(visual) != "resnet":
        raise TypeError("this ViT image tower carries no open_clip config")
    width = visual.layer1[0].conv1.in_channels
    heads = visual.attnpool.num_heads
    return {"embed_dim": int(visual.attnpool.c_proj.out_features),
            "vision_cfg": {"image_size": int(visual.image_size), "width": int(width), "head_width": int(width * 32 // heads),
                           "layers": [len(visual.layer1), len(visual.layer2), len(visual.layer3), len(visual.layer4)]},
            "quick_gelu": False}


def build_vision_tower(config: dict):
    """An open_clip image tower (random weights) from `vision_config`'s dict."""
    from open_clip.model import _build_vision_tower

    return _build_vision_tower(config["embed_dim"], dict(config["vision_cfg"]), quick_gelu=config.get("quick_gelu", False))


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
                         mean, std, device, config=open_clip.get_model_config(architecture))


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
        pair = ComfyCLIPPair(clip_vision, clip)
        image_dim, text_dim = pair.image_embed_dim(), pair.text_embed_dim()
        if image_dim != text_dim:
            raise NodeInputError("MC_CLIPFromComfy", "clip", f"the text encoder gives {text_dim}-wide embeddings but the "
                                 f"image tower (input 'clip_vision') gives {image_dim}-wide ones: they are not one CLIP "
                                 "model's two towers (pair e.g. clip_vision ViT-L/14 with a CLIP-L text encoder that "
                                 "carries its text projection)")
        return io.NodeOutput(pair)


NODES = [CLIPLoader, CLIPFromComfy]
