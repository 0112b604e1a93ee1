"""Semantic diffusion guidance nodes (paper 000; the algorithm is nodes/algorithms/sdg.py, the
ComfyUI glue nodes/glue/guidance.py): guidance functions (MC_GUIDANCE), the MODEL patch, and the
noise-aware encoder's loader and trainer."""
from __future__ import annotations

import os
import pathlib

import torch

import folder_paths
from comfy_api.v0_0_2 import io, ui

from . import clip_models, glue
from .algorithms import sdg as sdg_algo

MCClip = io.Custom("MC_CLIP")
MCGuidance = io.Custom("MC_GUIDANCE")
MCEncoder = io.Custom("MC_NOISE_AWARE_ENCODER")

folder_paths.add_model_folder_path(glue.ENCODER_FOLDER, os.path.join(folder_paths.models_dir, glue.ENCODER_FOLDER))
folder_paths.folder_names_and_paths[glue.ENCODER_FOLDER] = (folder_paths.folder_names_and_paths[glue.ENCODER_FOLDER][0],
                                                            {".safetensors"})
SHAPES_WORLD_ENCODER = "shapes_world (shipped)"
SHAPES_WORLD_ENCODER_PATH = pathlib.Path(__file__).resolve().parents[1] / "models" / "shapes_world" / "noise_aware.safetensors"
MODE_AUTO = "auto"


def scale_input(default: float, tooltip: str):
    return io.Float.Input("scale", default=default, min=-10000.0, max=10000.0, step=1.0, tooltip=tooltip)


def layers_input(purpose: str):
    return io.String.Input("layers", default="auto",
                           tooltip=f"Which feature maps of the image tower the {purpose} compares, comma-separated: for a "
                                   "ResNet tower 0 = stem, 1-4 = layer1-layer4; for a ViT, block numbers. 'auto': "
                                   + ("every ResNet stage (the paper's code)." if purpose == "style" else
                                      "the middle stages (2,3 for a ResNet)."))


def parse_layers(node: str, mc_clip, text: str, purpose: str) -> tuple[int, ...]:
    count = clip_models.feature_stages(mc_clip)
    try:
        return tuple(sdg_algo.parse_layers(text, count, clip_models.default_feature_layers(mc_clip, purpose)))
    except ValueError as e:
        raise glue.NodeInputError(node, "layers", str(e)) from None


def check_clip(node: str, mc_clip):
    if not clip_models.is_mc_clip(mc_clip):
        raise glue.NodeInputError(node, "mc_clip", "is not an MC_CLIP (use CLIP Loader (More Control) or the shapes-world loader)")


def reference_images(node: str, image: torch.Tensor) -> torch.Tensor:
    if image is None or image.dim() != 4 or image.shape[0] == 0:
        raise glue.NodeInputError(node, "image", "give at least one reference image")
    return image[..., :3].float().clone()


class TextGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MC_TextGuidance",
            display_name="Text Guidance (SDG)",
            category="More Control/semantic guidance",
            description="Semantic diffusion guidance by text (eq. 6): steers sampling towards images whose CLIP "
                        "embedding matches the text, even with a model that ignores prompts. Connect to Apply Semantic "
                        "Guidance.",
            inputs=[
                MCClip.Input("mc_clip", tooltip="The CLIP whose text tower embeds the text; in noise-aware mode the "
                                                 "encoder must have been trained from this CLIP's image tower."),
                io.String.Input("text", multiline=True, default="", tooltip="What the image should show."),
                scale_input(100.0, "Guidance strength s (the paper used 120-320). 0 switches it off."),
            ],
            outputs=[MCGuidance.Output(display_name="guidance", tooltip="For Apply Semantic Guidance or Combine Guidance.")],
        )

    @classmethod
    def execute(cls, mc_clip, text, scale) -> io.NodeOutput:
        node = "MC_TextGuidance"
        check_clip(node, mc_clip)
        if not text.strip():
            raise glue.NodeInputError(node, "text", "the text is empty: write what the image should show")
        with glue.gradients_enabled(), torch.no_grad():
            embedding = mc_clip.encode_text([text.strip()]).float().clone()
        return io.NodeOutput(glue.Guidance([glue.GuidanceTerm("text", float(scale), mc_clip, node, text_embedding=embedding)]))


class ImageContentGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MC_ImageContentGuidance",
            display_name="Image Content Guidance (SDG)",
            category="More Control/semantic guidance",
            description="Semantic diffusion guidance by a reference image's content: eq. 7 (the global CLIP embedding: "
                        "same content, free layout), or with 'structure' on, eq. 8 (spatial feature maps: the reference's "
                        "layout too).",
            inputs=[
                MCClip.Input("mc_clip", tooltip="The CLIP that compares images (decoded modes); the noise-aware encoder "
                                                 "replaces its image tower in noise-aware mode."),
                io.Image.Input("image", tooltip="The reference: one image for every sample, one per sample, or a number "
                                                "that divides the batch."),
                scale_input(100.0, "Guidance strength s (the paper used 100-200 for content). 0 switches it off."),
                io.Boolean.Input("structure", default=False,
                                 tooltip="Off: match the global embedding (eq. 7). On: match the spatial feature maps "
                                         "of 'layers' (eq. 8), which keeps the reference's layout."),
                layers_input("structure guidance"),
            ],
            outputs=[MCGuidance.Output(display_name="guidance", tooltip="For Apply Semantic Guidance or Combine Guidance.")],
        )

    @classmethod
    def execute(cls, mc_clip, image, scale, structure, layers) -> io.NodeOutput:
        node = "MC_ImageContentGuidance"
        check_clip(node, mc_clip)
        reference = reference_images(node, image)
        picked = parse_layers(node, mc_clip, layers, "structure") if structure else ()
        term = glue.GuidanceTerm("structure" if structure else "content", float(scale), mc_clip, node,
                                 reference=reference, layers=picked)
        return io.NodeOutput(glue.Guidance([term]))


class ImageStyleGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MC_ImageStyleGuidance",
            display_name="Image Style Guidance (SDG)",
            category="More Control/semantic guidance",
            description="Semantic diffusion guidance by a reference image's style (eq. 9): matches the Gram matrices of "
                        "the image tower's feature maps, one per sample (never mixed across the batch).",
            inputs=[
                MCClip.Input("mc_clip", tooltip="The CLIP whose feature maps define style (decoded modes)."),
                io.Image.Input("image", tooltip="The style reference: one image, one per sample, or a divisor of the batch."),
                scale_input(1000.0, "Guidance strength s. Gram distances are small numbers: style needs larger scales "
                                    "than content. 0 switches it off."),
                layers_input("style"),
            ],
            outputs=[MCGuidance.Output(display_name="guidance", tooltip="For Apply Semantic Guidance or Combine Guidance.")],
        )

    @classmethod
    def execute(cls, mc_clip, image, scale, layers) -> io.NodeOutput:
        node = "MC_ImageStyleGuidance"
        check_clip(node, mc_clip)
        term = glue.GuidanceTerm("style", float(scale), mc_clip, node, reference=reference_images(node, image),
                                 layers=parse_layers(node, mc_clip, layers, "style"))
        return io.NodeOutput(glue.Guidance([term]))


class CombineGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        optional = []
        for i in (3, 4):
            optional += [MCGuidance.Input(f"guidance_{i}", optional=True, tooltip="Another guidance (optional)."),
                         io.Float.Input(f"weight_{i}", default=1.0, min=-100.0, max=100.0, step=0.05,
                                        tooltip="Multiplies that guidance's own scale.")]
        return io.Schema(
            node_id="MC_CombineGuidance",
            display_name="Combine Guidance (SDG)",
            category="More Control/semantic guidance",
            description="Eq. 10: a weighted sum of guidance functions (e.g. text + image). Each keeps its own scale, "
                        "multiplied by its weight here. Chain several to combine any number.",
            inputs=[
                MCGuidance.Input("guidance_1", tooltip="A guidance."),
                io.Float.Input("weight_1", default=1.0, min=-100.0, max=100.0, step=0.05, tooltip="Multiplies its scale."),
                MCGuidance.Input("guidance_2", tooltip="Another guidance."),
                io.Float.Input("weight_2", default=1.0, min=-100.0, max=100.0, step=0.05, tooltip="Multiplies its scale."),
                *optional,
            ],
            outputs=[MCGuidance.Output(display_name="guidance", tooltip="The combined guidance.")],
        )

    @classmethod
    def execute(cls, guidance_1, weight_1, guidance_2, weight_2, guidance_3=None, weight_3=1.0, guidance_4=None,
                weight_4=1.0) -> io.NodeOutput:
        parts = [(g, w) for g, w in ((guidance_1, weight_1), (guidance_2, weight_2), (guidance_3, weight_3),
                                     (guidance_4, weight_4)) if g is not None]
        return io.NodeOutput(glue.combine_guidance(parts))


class ApplySemanticGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MC_ApplySemanticGuidance",
            display_name="Apply Semantic Guidance (SDG)",
            category="More Control/semantic guidance",
            description="Steers every sampler with a guidance function (text, image content, structure, style, or a "
                        "combination) by its gradient: denoised + σ²∇F, between start and end percent. 'noise-aware' "
                        "reads the noisy latent with a time-conditioned encoder (no VAE decode, no UNet backward: cheap); "
                        "'decoded' uses the plain CLIP on the decoded clean-image prediction.",
            inputs=[
                io.Model.Input("model", tooltip="Any model ComfyUI loads. It is cloned; yours is not changed."),
                MCGuidance.Input("guidance", tooltip="From Text / Image Content / Image Style / Combine Guidance."),
                io.Combo.Input("mode", options=[MODE_AUTO] + glue.MODES, default=MODE_AUTO,
                               tooltip="auto: noise-aware when an encoder is connected, else decoded (fast). "
                                       "noise-aware: the paper's way, cheapest. decoded (exact): gradient through the "
                                       "UNet and the VAE decoder (slowest). decoded (fast): gradient at the clean "
                                       "prediction through the VAE decoder only."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First step guided (0 = the first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Last step guided (1 = the last step). Late steps add detail, not content: "
                                       "0.8 saves time with little change."),
                io.Int.Input("every_n_steps", default=1, min=1, max=100,
                             tooltip="Guide one step in N inside the range (1 = every step): N times cheaper."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the noise that re-noises the reference image each step (noise-aware mode)."),
                io.Vae.Input("vae", optional=True,
                             tooltip="The model's VAE: needed for the decoded modes and for image references."),
                MCEncoder.Input("noise_aware_encoder", optional=True,
                                tooltip="A time-conditioned encoder for this model's latents (Noise-Aware Encoder "
                                        "Loader or Train Noise-Aware Encoder)."),
            ],
            outputs=[io.Model.Output(tooltip="The guided model; plug it into any sampler.")],
        )

    @classmethod
    def validate_inputs(cls, start_percent, end_percent, **kwargs):
        if start_percent > end_percent:
            return "MC_ApplySemanticGuidance: input 'start_percent' must not be after 'end_percent'"
        return True

    @classmethod
    def execute(cls, model, guidance, mode, start_percent, end_percent, every_n_steps, seed, vae=None,
                noise_aware_encoder=None) -> io.NodeOutput:
        node = "MC_ApplySemanticGuidance"
        if not isinstance(guidance, glue.Guidance):
            raise glue.NodeInputError(node, "guidance", "is not an MC_GUIDANCE")
        if mode == MODE_AUTO:
            mode = glue.MODE_NOISE_AWARE if noise_aware_encoder is not None else glue.MODE_FAST
        settings = glue.SemanticSettings(mode=mode, start_percent=start_percent, end_percent=end_percent,
                                         every_n_steps=every_n_steps, seed=seed)
        return io.NodeOutput(glue.apply_semantic_guidance(model, guidance, settings, vae, noise_aware_encoder, node))


def encoder_options() -> list[str]:
    return [SHAPES_WORLD_ENCODER] + folder_paths.get_filename_list(glue.ENCODER_FOLDER)


def encoder_path(name: str) -> str | None:
    if name == SHAPES_WORLD_ENCODER:
        return str(SHAPES_WORLD_ENCODER_PATH) if SHAPES_WORLD_ENCODER_PATH.exists() else None
    return folder_paths.get_full_path(glue.ENCODER_FOLDER, name)


_ENCODER_CACHE: dict = {}


class NoiseAwareEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MC_NoiseAwareEncoderLoader",
            display_name="Noise-Aware Encoder Loader (SDG)",
            category="More Control/loaders",
            description="Loads a time-conditioned CLIP image tower that reads noisy latents (trained by Train "
                        "Noise-Aware Encoder, or the one shipped for the shapes world).",
            inputs=[io.Combo.Input("encoder_name", options=encoder_options(),
                                   tooltip=f"A file in models/{glue.ENCODER_FOLDER}/, or the shapes-world encoder that "
                                           "ships with the pack.")],
            outputs=[MCEncoder.Output(display_name="noise_aware_encoder")],
        )

    @classmethod
    def execute(cls, encoder_name) -> io.NodeOutput:
        node = "MC_NoiseAwareEncoderLoader"
        path = encoder_path(encoder_name)
        if path is None:
            raise glue.NodeInputError(node, "encoder_name", f"{encoder_name!r} is not there")
        key = (path, os.path.getmtime(path))
        if key not in _ENCODER_CACHE:
            try:
                _ENCODER_CACHE.clear()
                _ENCODER_CACHE[key] = glue.load_noise_aware_encoder(path)
            except (ValueError, KeyError, RuntimeError) as e:
                raise glue.NodeInputError(node, "encoder_name", f"cannot load {encoder_name}: {e}") from None
        return io.NodeOutput(_ENCODER_CACHE[key])


PACK_DIR = pathlib.Path(__file__).resolve().parents[1]


def resolve_folder(folder: str) -> pathlib.Path:
    """An absolute folder as given; a relative one inside ComfyUI's input folder, else inside the pack
    (where the example workflow's scenes are)."""
    path = pathlib.Path(folder).expanduser()
    if path.is_absolute():
        return path
    for root in (pathlib.Path(folder_paths.get_input_directory()), PACK_DIR):
        if (root / path).is_dir():
            return root / path
    return pathlib.Path(folder_paths.get_input_directory()) / path


class TrainNoiseAwareEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MC_TrainNoiseAwareEncoder",
            display_name="Train Noise-Aware Encoder (SDG)",
            category="More Control/semantic guidance",
            is_output_node=True,
            description="The paper's self-supervised fine-tune, no captions needed: a time-conditioned copy of the CLIP "
                        "image tower learns to embed your images' noised latents as the frozen CLIP embeds the clean "
                        "images. Saves a safetensors file (with its record and loss curve) in "
                        f"models/{glue.ENCODER_FOLDER}/ and checkpoints as it goes.",
            inputs=[
                MCClip.Input("mc_clip", tooltip="The CLIP to copy (an open_clip ResNet or ViT tower)."),
                io.Model.Input("model", tooltip="The diffusion model the encoder will guide: its latent format and noise "
                                                "schedule are what the encoder learns to read."),
                io.Vae.Input("vae", tooltip="The model's VAE (encodes your images to latents)."),
                io.String.Input("folder", default="", tooltip="A folder of your images (png/jpg/webp), used with or "
                                                             "instead of the 'images' input. A relative path is looked "
                                                             "up in ComfyUI's input folder."),
                io.String.Input("name", default="noise_aware_encoder", tooltip="File name (without extension)."),
                io.Int.Input("steps", default=2000, min=1, max=1000000, tooltip="Optimiser steps."),
                io.Int.Input("batch_size", default=32, min=2, max=1024,
                             tooltip="Images per step (the contrastive loss needs at least 2; the paper used 256)."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=8,
                             tooltip="Images are resized and centre-cropped to this square size before encoding."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1e-2, step=1e-5,
                               tooltip="AdamW learning rate (the paper's 1e-4)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seed of batches and noise."),
                io.Boolean.Input("resume", default=True, tooltip="Continue from this name's checkpoint if there is one."),
                io.Float.Input("alignment_weight", default=sdg_algo.ALIGNMENT_WEIGHT, min=0.0, max=10000.0, step=1.0,
                               tooltip="Weight of a term (ours) pulling each noisy embedding towards its clean one "
                                       "(1 - cosine), added to the paper's contrastive loss. 0 = the paper's loss "
                                       "alone, which with small batches and short runs drifts away from CLIP's "
                                       "embeddings that guidance compares against."),
                io.Image.Input("images", optional=True, tooltip="Training images (an IMAGE batch)."),
            ],
            outputs=[
                MCEncoder.Output(display_name="noise_aware_encoder"),
                io.Image.Output(display_name="loss_curve", tooltip="The loss per step."),
                io.String.Output(display_name="info", tooltip="Where the file is, steps, final loss."),
            ],
        )

    @classmethod
    def execute(cls, mc_clip, model, vae, folder, name, steps, batch_size, resolution, learning_rate, seed, resume,
                alignment_weight=sdg_algo.ALIGNMENT_WEIGHT, images=None) -> io.NodeOutput:
        node = "MC_TrainNoiseAwareEncoder"
        check_clip(node, mc_clip)
        if not name.strip() or any(c in name for c in "/\\:"):
            raise glue.NodeInputError(node, "name", "give a plain file name")
        pictures = []
        if images is not None:
            pictures.append(images[..., :3])
        if folder.strip():
            try:
                pictures.append(glue.images_from_folder(resolve_folder(folder.strip()), resolution))
            except ValueError as e:
                raise glue.NodeInputError(node, "folder", str(e)) from None
        if not pictures:
            raise glue.NodeInputError(node, "images", "connect training images or give a folder")
        out_dir = pathlib.Path(folder_paths.get_folder_paths(glue.ENCODER_FOLDER)[0])
        result = glue.train_noise_aware_encoder(mc_clip, model, vae, pictures, out_dir / f"{name.strip()}.safetensors",
                                                steps=steps, batch_size=batch_size, resolution=resolution,
                                                lr=learning_rate, seed=seed, resume=resume, node=node,
                                                alignment_weight=alignment_weight)
        curve = result["loss_curve"]
        return io.NodeOutput(result["encoder"], curve, result["info"], ui=ui.PreviewImage(curve, cls=cls))


NODES = [TextGuidance, ImageContentGuidance, ImageStyleGuidance, CombineGuidance, ApplySemanticGuidance,
         NoiseAwareEncoderLoader, TrainNoiseAwareEncoder]
