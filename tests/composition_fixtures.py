"""Test-only nodes that bring the tiny models of tests/tiny_models.py and given tensors into a graph run
by ComfyUI's own executor, and hand the output tensors back unquantised (a saved PNG would round them
to 8 bits). They are registered in ComfyUI's NODE_CLASS_MAPPINGS for the test session only; the pack
never sees them."""
from __future__ import annotations

import torch

import tiny_models

TENSORS: dict[str, torch.Tensor] = {}
CAPTURED: dict[str, torch.Tensor] = {}
_MODELS: dict = {}


def tiny_bundle():
    if not _MODELS:
        _MODELS.update(model=tiny_models.tiny_model("sd15", seed=0), clip=tiny_models.tiny_clip(seed=2),
                       vae=tiny_models.tiny_vae(seed=3))
    return _MODELS


class TinyModels:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self):
        b = tiny_bundle()
        return b["model"], b["clip"], b["vae"]


class GivenImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("STRING", {"default": "source"})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "give"
    CATEGORY = "testing"

    @classmethod
    def IS_CHANGED(cls, name):
        return float("nan")

    def give(self, name):
        return (TENSORS[name],)


class GivenMask(GivenImage):
    RETURN_TYPES = ("MASK",)


class Capture:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("STRING", {"default": "out"})},
                "optional": {"image": ("IMAGE",), "mask": ("MASK",)}}

    RETURN_TYPES = ()
    FUNCTION = "capture"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def capture(self, name, image=None, mask=None):
        CAPTURED[name] = (image if image is not None else mask).clone()
        return {}


NODE_CLASS_MAPPINGS = {"MCTest_TinyModels": TinyModels, "MCTest_GivenImage": GivenImage,
                       "MCTest_GivenMask": GivenMask, "MCTest_Capture": Capture}


def register(comfy_nodes) -> None:
    comfy_nodes.NODE_CLASS_MAPPINGS.update(NODE_CLASS_MAPPINGS)
