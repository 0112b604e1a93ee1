"""More Control: ComfyUI nodes for segmentation-free guidance, blended latent editing,
semantic diffusion guidance and multi-turn composition.

ComfyUI loads this file. The pack uses the V3 node API pinned to comfy_api v0_0_2 (shipped
with ComfyUI 0.3.75) and exports only `comfy_entrypoint`: a module that also exported
NODE_CLASS_MAPPINGS would be loaded as V1 and its entrypoint ignored.
"""
from .nodes import MoreControlExtension

WEB_DIRECTORY = "./web"


async def comfy_entrypoint() -> MoreControlExtension:
    return MoreControlExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
