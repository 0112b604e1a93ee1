"""The one place that touches ComfyUI internals: errors, model access, patch points, gradients.

Node modules call these helpers instead of reaching into `comfy` themselves, so a change in
ComfyUI's internals is mended here once:
  glue (this module)   clear input errors, leaving inference mode, model access
  glue.attention       cross-attention sites, prompt token maps, the shared attn2 replacement,
                       segmentation-free guidance as a MODEL patch and as a GUIDER
  glue.joint_attention the same hook on SD3/Flux joint attention (dit block replacements and
                       ComfyUI's attention override)
  glue.sampling        masked sampling: the denoise-mask hook, the blended sampler, progress
                       bars, throw-away VAE copies
Their public names are re-exported here (`glue.apply_segfree_guidance`, ...).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch



class NodeInputError(ValueError):
    """Bad input to a node: the message names the node and the input, never a torch trace.

    ComfyUI shows the exception's message in the UI; raising this before touching any
    tensor of the user's means nothing the user had is lost.
    """

    def __init__(self, node: str, input_name: str, message: str):
        self.node, self.input_name = node, input_name
        super().__init__(f"{node}: input '{input_name}': {message}")


@contextlib.contextmanager
def gradients_enabled():
    """Leave ComfyUI's inference mode locally (its executor runs every node under
    `torch.inference_mode()`), so optimisation code can build a graph. Tensors that came in
    from ComfyUI are inference tensors: `.clone()` them inside this block before use."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def outside_inference(t: torch.Tensor) -> torch.Tensor:
    """A normal tensor with the same values (call inside `gradients_enabled`)."""
    return t.detach().clone()


# ---------------------------------------------------------------------------------------------
# Model access

def diffusion_model(model_patcher):
    """The network inside a MODEL (a ComfyUI ModelPatcher)."""
    return model_patcher.model.diffusion_model


def vae_ratio(vae) -> int:
    """How many pixels one latent cell spans (8 for SD's VAEs), as VAE Encode crops by it."""
    return int(vae.spacial_compression_encode())


def model_family(model_patcher) -> str:
    """A name users recognise: the supported-model config (SD15, SDXL, Flux, SD3...)."""
    config = getattr(model_patcher.model, "model_config", None)
    return type(config).__name__ if config is not None else type(model_patcher.model).__name__


@dataclass(frozen=True)
class CrossAttentionSite:
    """One cross-attention (attn2) module of a UNet, keyed as ComfyUI's patch_replace keys it."""
    block: str          # "input" | "middle" | "output"
    number: int         # index of the block in input_blocks/output_blocks (0 for middle)
    transformer_index: int  # index of the BasicTransformerBlock inside its SpatialTransformer
    heads: int
    dim_head: int

    @property
    def key(self) -> tuple:
        return (self.block, self.number, self.transformer_index)


def cross_attention_sites(model_patcher) -> list[CrossAttentionSite]:
    """Every attn2 of an SD1.x/SD2.x/SDXL-style UNet, in ComfyUI's replace-key form.

    Returns [] for networks without UNet cross-attention (DiT/MMDiT families such as SD3 and
    Flux run joint attention under `patches_replace["dit"]` instead)."""
    net = diffusion_model(model_patcher)
    sites = []
    groups = [("input", getattr(net, "input_blocks", [])), ("output", getattr(net, "output_blocks", []))]
    middle = getattr(net, "middle_block", None)
    for block_name, blocks in groups + ([("middle", [middle])] if middle is not None else []):
        for number, block in enumerate(blocks):
            for layer in block:
                for index, tb in enumerate(getattr(layer, "transformer_blocks", [])):
                    attn2 = getattr(tb, "attn2", None)
                    if attn2 is None or not hasattr(attn2, "to_k"):
                        continue
                    sites.append(CrossAttentionSite(block_name, number, index, attn2.heads, attn2.dim_head))
    return sites


def existing_attn2_replacement(model_patcher, site: CrossAttentionSite):
    """The attn2 replacement another node already installed at this site, if any. ComfyUI looks
    up the 3-part key first, then the 2-part (block, number) key: so do we."""
    replace = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    return replace.get(site.key) or replace.get(site.key[:2])


from .attention import *  # noqa: E402,F401,F403
from .attention import SEGFREE_KEY, SEGMAP_KEY, TOKEN_MAP_KEY  # noqa: E402,F401
from .sampling import *  # noqa: E402,F401,F403
from .joint_attention import *  # noqa: E402,F401,F403
from .guidance import *  # noqa: E402,F401,F403
from .composition import *  # noqa: E402,F401,F403
