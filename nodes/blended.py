"""Blended Latent Diffusion nodes: local text-driven edits whose background is the source image.

ComfyUI already blends a masked latent at every step (Set Latent Noise Mask + any sampler); these
nodes add what the paper has and the core lacks:

  MC_ProgressiveMaskShrink  MODEL patch: dilated masks early, the mask itself late (Sec. 4.3)
  MC_BlendedLatentSampler   a KSampler for masked latents with the paper's blend: fresh background
                            noise every step, blend at the next noise level after each step, the
                            exact source latent outside the final mask (Alg. 1)
  MC_BlendedSampler         the same blend as a SAMPLER for SamplerCustomAdvanced / custom guiders
  MC_DecoderFineTune        background reconstruction by fine-tuning a throw-away decoder (Sec. 4.2)
  MC_LatentOptimization     the latent-optimisation alternative (Sec. 4.2, Eq. 1)
  MC_PixelBlend             pixel paste / Poisson blending alternatives
  MC_RankByCLIP             rank a batch of edits by CLIP similarity in the mask (Sec. 4.4)

The algorithms are in `algorithms/blended.py`; the sampler loop that speaks ComfyUI's sampler
protocol, the denoise-mask hook and the throw-away VAE copies are in `glue/sampling.py`.
"""
from __future__ import annotations

import logging

import torch

from comfy_api.v0_0_2 import io

from .algorithms import blended as algo
from .clip_models import MCClip, is_mc_clip
from . import glue
from .glue import NodeInputError, gradients_enabled, outside_inference

CATEGORY = "More Control/blended latent"

THRESHOLD_TOOLTIP = ("Soft masks are made binary as the paper's code does: values >= threshold are edited, "
                     "the rest is background.")


def _threshold_input():
    return io.Float.Input("threshold", default=0.5, min=0.001, max=1.0, step=0.01, tooltip=THRESHOLD_TOOLTIP)


def _masks_for(node: str, mask: torch.Tensor, batch: int, height: int, width: int, threshold: float,
               input_name: str = "mask") -> torch.Tensor:
    """Binary masks [batch, height, width] from a MASK of any size, one mask or one per image."""
    try:
        return algo.binarize(algo.fit_masks(mask, batch, height, width), threshold)
    except ValueError as e:
        raise NodeInputError(node, input_name, str(e)) from None


def _fit_source(node: str, source: torch.Tensor, batch: int, height: int, width: int, input_name: str) -> torch.Tensor:
    """The source image at the size of the decoded edit. VAE Encode crops images whose sides are not
    multiples of 8 (centred, as `vae_encode_crop_pixels`); the same crop is applied here."""
    if source.shape[0] not in (1, batch):
        raise NodeInputError(node, input_name, f"has {source.shape[0]} images for {batch} edits: give one, or one per edit")
    h, w = source.shape[1:3]
    if (h, w) != (height, width):
        if height <= h < height + 8 and width <= w < width + 8:
            top, left = (h - height) // 2, (w - width) // 2
            source = source[:, top:top + height, left:left + width]
        else:
            raise NodeInputError(node, input_name, f"is {w}x{h} pixels but the edit is {width}x{height}: "
                                 "use the image the edit was made from")
    return source[..., :3].expand(batch, -1, -1, -1)


def _crop_like(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The same centred crop for a [B, H, W] mask that matches the uncropped source."""
    h, w = mask.shape[-2:]
    if (h, w) == (height, width) or not (height <= h < height + 8 and width <= w < width + 8):
        return mask
    top, left = (h - height) // 2, (w - width) // 2
    return mask[..., top:top + height, left:left + width]


# ---------------------------------------------------------------------------------------------
# Progressive mask shrinking

class ProgressiveMaskShrink(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MC_ProgressiveMaskShrink",
            display_name="Progressive Mask Shrink",
            category=CATEGORY,
            description="Edits thin masks: samples with a dilated latent mask early and the mask itself late "
                        "(Blended Latent Diffusion, Sec. 4.3). Works with any sampler on a latent with a noise mask.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch (a clone is patched; yours is untouched)."),
                io.String.Input("kernels", default="7,5,3,1",
                                tooltip="Dilation kernel per stage, most dilated first; odd sizes of a square of ones, "
                                        "1 = the mask itself. The paper: 7,5,3,1."),
                io.String.Input("parts", default="1,1,1,1",
                                tooltip="Relative share of the sampling steps of each stage (same count as kernels). "
                                        "The paper: four equal parts."),
                _threshold_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(cls, kernels, parts, **kwargs):
        try:
            algo.ShrinkSchedule(algo.parse_int_list(kernels), algo.parse_float_list(parts))
        except ValueError as e:
            return f"MC_ProgressiveMaskShrink: kernels/parts: {e}"
        return True

    @classmethod
    def execute(cls, model, kernels, parts, threshold) -> io.NodeOutput:
        node = "MC_ProgressiveMaskShrink"
        try:
            kernel_list = algo.parse_int_list(kernels)
        except ValueError:
            raise NodeInputError(node, "kernels", f"{kernels!r} is not a comma-separated list of integers") from None
        try:
            part_list = algo.parse_float_list(parts)
        except ValueError:
            raise NodeInputError(node, "parts", f"{parts!r} is not a comma-separated list of numbers") from None
        try:
            schedule = algo.ShrinkSchedule(kernel_list, part_list)
        except ValueError as e:
            raise NodeInputError(node, "kernels" if "kernel" in str(e) else "parts", str(e)) from None
        patched = model.clone()
        previous = model.model_options.get("denoise_mask_function")
        patched.set_model_denoise_mask_function(glue.ShrinkMaskFunction(schedule, threshold, previous))
        return io.NodeOutput(patched)


# ---------------------------------------------------------------------------------------------
# The blended sampler

class BlendedLatentSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MC_BlendedLatentSampler",
            display_name="Blended Latent Sampler",
            category=CATEGORY,
            description="KSampler for local edits (Blended Latent Diffusion, Alg. 1): generates inside the mask and blends "
                        "the source latent, noised to the next level, outside it after every step; the result is the exact "
                        "source latent outside the final mask.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (optionally patched by Progressive Mask Shrink)."),
                io.Conditioning.Input("positive", tooltip="What to put in the masked region."),
                io.Conditioning.Input("negative", tooltip="What to avoid."),
                io.Latent.Input("latent_image", tooltip="The encoded source image (VAE Encode), optionally with a noise mask."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of the initial noise and of the fresh background noise."),
                io.Int.Input("steps", default=50, min=1, max=10000, tooltip="Sampling steps (the paper: 50 DDIM steps)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (the paper's SD scripts: 7.5)."),
                io.Combo.Input("sampler_name", options=glue.sampler_names(), default="ddim",
                               tooltip="Inner sampler, run one step at a time (multistep samplers act as first-order)."),
                io.Combo.Input("scheduler", options=glue.scheduler_names(), default="ddim_uniform",
                               tooltip="Noise schedule."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of the schedule to run: 1.0 starts from pure noise in the mask; the SD "
                                       "scripts' blending_start_percentage 0.25 is 0.75."),
                io.Boolean.Input("fresh_noise", default=True,
                                 tooltip="Fresh background noise at every step (the paper). Off: one fixed noise tensor, "
                                         "as ComfyUI's built-in inpainting."),
                _threshold_input(),
                io.Mask.Input("mask", optional=True,
                              tooltip="The region to edit, any size (resized to the latent). Without it, the latent's "
                                      "noise mask (Set Latent Noise Mask) is used."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, denoise,
                fresh_noise, threshold, mask=None) -> io.NodeOutput:
        node = "MC_BlendedLatentSampler"
        source = latent_image["samples"]
        if source.ndim != 4:
            raise NodeInputError(node, "latent_image", f"expects an image latent [B, C, H, W], got shape {tuple(source.shape)}")
        source = glue.fix_empty_latent_channels(model, source)
        if mask is None:
            mask = latent_image.get("noise_mask")
            if mask is None:
                raise NodeInputError(node, "mask", "no mask given and the latent has no noise mask: connect a MASK, "
                                     "or use Set Latent Noise Mask")
            input_name = "latent_image"
        else:
            input_name = "mask"
        batch, _, h, w = source.shape
        if mask.ndim == 4:  # a noise mask may carry a channel axis
            mask = mask.reshape(-1, mask.shape[-2], mask.shape[-1])
        # A mask drawn on an image whose sides are not multiples of 8 covers the pixels VAE Encode cropped
        # away (centred): crop it the same way before resizing it to the latent, so it stays aligned.
        ratio = getattr(model.get_model_object("latent_format"), "spacial_downscale_ratio", 8)
        mask = _crop_like(mask, h * ratio, w * ratio)
        latent_mask = _masks_for(node, mask, batch, h, w, threshold, input_name)
        if not bool(latent_mask.any()):
            logging.warning("[More Control] %s: the mask is empty after thresholding at %s; the result is the source", node, threshold)

        samples = glue.blended_sample(model, positive, negative, source, latent_mask, seed, steps, cfg, sampler_name,
                                      scheduler, denoise, fresh_noise, latent_image.get("batch_index"))
        return io.NodeOutput({**latent_image, "samples": samples})


class BlendedSamplerWrapper(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MC_BlendedSampler",
            display_name="Blended Sampler (for SamplerCustomAdvanced)",
            category=CATEGORY,
            description="Wraps a SAMPLER with Blended Latent Diffusion's blend (fresh background noise each step, blend at "
                        "the next noise level, the source after the last step) for SamplerCustomAdvanced and custom guiders. "
                        "The latent needs a noise mask. Outside the mask the result is the source up to the last bit of the "
                        "latent scaling; the Blended Latent Sampler node pastes it exactly.",
            inputs=[
                io.Sampler.Input("sampler", tooltip="The inner sampler (KSamplerSelect), run one step at a time."),
                io.Boolean.Input("fresh_noise", default=True,
                                 tooltip="Fresh background noise at every step (the paper). Off: one fixed noise tensor."),
                _threshold_input(),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, sampler, fresh_noise, threshold) -> io.NodeOutput:
        if not callable(getattr(sampler, "sampler_function", None)):
            raise NodeInputError("MC_BlendedSampler", "sampler", f"{type(sampler).__name__} is not a k-diffusion sampler "
                                 "(use KSamplerSelect or a node that outputs one)")
        return io.NodeOutput(glue.BlendedSampler(sampler, fresh_noise, None, threshold=threshold))


# ---------------------------------------------------------------------------------------------
# Background reconstruction

def _reconstruction_inputs(node: str, vae, latent: dict, source_image: torch.Tensor, mask: torch.Tensor, threshold: float):
    """Checks and lays out what both reconstruction nodes need: latents, the source image and binary
    masks at the decoded size, in the VAE's [-1, 1] range."""
    z = latent["samples"]
    if not hasattr(vae, "first_stage_model") or z.ndim != 4:
        raise NodeInputError(node, "vae" if not hasattr(vae, "first_stage_model") else "latent",
                             "needs an image VAE and an image latent [B, C, H, W]")
    if z.shape[1] != getattr(vae, "latent_channels", z.shape[1]):
        raise NodeInputError(node, "latent", f"has {z.shape[1]} channels but the VAE decodes {vae.latent_channels}")
    ratio = vae.spacial_compression_decode()
    batch, height, width = z.shape[0], z.shape[2] * ratio, z.shape[3] * ratio
    source = _fit_source(node, source_image, batch, height, width, "source_image")
    masks = _masks_for(node, mask, batch, source_image.shape[1], source_image.shape[2], threshold)
    masks = _crop_like(masks, height, width)
    if masks.shape[-2:] != (height, width):
        masks = _masks_for(node, masks, batch, height, width, 0.5)
    return z, source, masks


class DecoderFineTune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MC_DecoderFineTune",
            display_name="Decoder Fine-Tune (background reconstruction)",
            category=CATEGORY,
            description="Decodes an edited latent with a decoder fine-tuned per image so the background matches the "
                        "source image and the edit matches the plain decode (Blended Latent Diffusion, Sec. 4.2, Eq. 3). "
                        "Your VAE is not modified.",
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE the edit was encoded with; a throw-away copy is fine-tuned per image."),
                io.Latent.Input("latent", tooltip="The edited latent(s) (e.g. the best of Rank by CLIP)."),
                io.Image.Input("source_image", tooltip="The original image (one for all edits, or one per edit)."),
                io.Mask.Input("mask", tooltip="The edited region, any size (resized to the image)."),
                io.Int.Input("steps", default=75, min=1, max=10000, tooltip="Adam steps per image (the paper: 75)."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5, round=1e-7,
                               tooltip="Adam learning rate (the paper: 1e-4)."),
                io.Float.Input("background_weight", default=100.0, min=0.0, max=1e5, step=1.0,
                               tooltip="Weight of the background term against the edited-region term (the paper: 100)."),
                _threshold_input(),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, vae, latent, source_image, mask, steps, learning_rate, background_weight, threshold) -> io.NodeOutput:
        node = "MC_DecoderFineTune"
        z, source, masks = _reconstruction_inputs(node, vae, latent, source_image, mask, threshold)
        images = []
        on_step = glue.progress_callback(steps * z.shape[0])
        with gradients_enabled():
            for b in range(z.shape[0]):
                # A fresh copy per image: each edit gets its own decoder, as in the paper's code, which
                # restores the decoder after every image.
                model, decode, params, device = glue.decoder_copy(vae)
                zb = outside_inference(z[b:b + 1]).to(device, torch.float32)
                xb = vae.process_input(outside_inference(source[b:b + 1])).movedim(-1, 1).to(device, torch.float32)
                mb = outside_inference(masks[b:b + 1])[:, None].to(device, torch.float32)
                result = algo.finetune_decoder(decode, params, zb, xb, mb, steps, learning_rate, background_weight,
                                               on_step=on_step)
                images.append(vae.process_output(result.image).movedim(1, -1).float().cpu())
                logging.info("[More Control] %s image %d: loss %.5f -> %.5f", node, b, result.losses[0], result.losses[-1])
                del model, decode, params
        return io.NodeOutput(torch.cat(images))


class LatentOptimization(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MC_LatentOptimization",
            display_name="Latent Optimization (background reconstruction)",
            category=CATEGORY,
            description="Optimises the edited latent so its decode matches the source image outside the mask and the plain "
                        "decode inside it (Blended Latent Diffusion, Sec. 4.2, Eq. 1). Smoother than the decoder fine-tune.",
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE the edit was encoded with (used frozen)."),
                io.Latent.Input("latent", tooltip="The edited latent(s)."),
                io.Image.Input("source_image", tooltip="The original image (one for all edits, or one per edit)."),
                io.Mask.Input("mask", tooltip="The edited region, any size (resized to the image)."),
                io.Int.Input("steps", default=75, min=1, max=10000, tooltip="Adam steps per image."),
                io.Float.Input("learning_rate", default=0.1, min=1e-7, max=10.0, step=1e-3, round=1e-7,
                               tooltip="Adam learning rate on the latent (the official code: 0.1; the paper says 1e-4, "
                                       "which barely moves a latent in 75 steps)."),
                io.Float.Input("background_weight", default=100.0, min=0.0, max=1e5, step=1.0,
                               tooltip="Weight of the background term against the edited-region term (the paper: 100)."),
                _threshold_input(),
            ],
            outputs=[io.Image.Output(), io.Latent.Output()],
        )

    @classmethod
    def execute(cls, vae, latent, source_image, mask, steps, learning_rate, background_weight, threshold) -> io.NodeOutput:
        node = "MC_LatentOptimization"
        z, source, masks = _reconstruction_inputs(node, vae, latent, source_image, mask, threshold)
        images, latents = [], []
        on_step = glue.progress_callback(steps * z.shape[0])
        with gradients_enabled():
            model, decode, _, device = glue.decoder_copy(vae)
            model.requires_grad_(False)
            for b in range(z.shape[0]):
                zb = outside_inference(z[b:b + 1]).to(device, torch.float32)
                xb = vae.process_input(outside_inference(source[b:b + 1])).movedim(-1, 1).to(device, torch.float32)
                mb = outside_inference(masks[b:b + 1])[:, None].to(device, torch.float32)
                result = algo.optimize_latent(decode, zb, xb, mb, steps, learning_rate, background_weight, on_step=on_step)
                images.append(vae.process_output(result.image).movedim(1, -1).float().cpu())
                latents.append(result.latent.cpu().to(z.dtype))
        return io.NodeOutput(torch.cat(images), {**latent, "samples": torch.cat(latents)})


# ---------------------------------------------------------------------------------------------
# Pixel blending

class PixelBlend(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MC_PixelBlend",
            display_name="Pixel Blend (paste / Poisson)",
            category=CATEGORY,
            description="Puts the edited region into the source image: a plain paste, or Poisson (seamless) blending, "
                        "with an optional feathered edge. The pixel-level alternatives to background reconstruction.",
            inputs=[
                io.Image.Input("edited_image", tooltip="The decoded edit(s)."),
                io.Image.Input("source_image", tooltip="The original image (one for all edits, or one per edit)."),
                io.Mask.Input("mask", tooltip="The edited region, any size (resized to the image)."),
                io.Combo.Input("mode", options=["paste", "poisson"], default="poisson",
                               tooltip="paste: edited pixels inside the mask, source outside. poisson: the edit's gradients "
                                       "inside the mask, matched to the source at the mask's edge (seamless cloning)."),
                io.Float.Input("feather", default=0.0, min=0.0, max=256.0, step=0.5,
                               tooltip="Width in pixels of a soft edge (a Gaussian blur of the mask); 0 = hard edge."),
                _threshold_input(),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, edited_image, source_image, mask, mode, feather, threshold) -> io.NodeOutput:
        node = "MC_PixelBlend"
        batch, height, width = edited_image.shape[:3]
        source = _fit_source(node, source_image, batch, height, width, "source_image")
        masks = _crop_like(_masks_for(node, mask, batch, source_image.shape[1], source_image.shape[2], threshold), height, width)
        if masks.shape[-2:] != (height, width):
            masks = _masks_for(node, masks, batch, height, width, 0.5)
        edited = edited_image[..., :3].float()
        if mode == "poisson":
            edited = torch.stack([algo.poisson_blend(edited[b], source[b].float(), masks[b]) for b in range(batch)])
        elif mode != "paste":
            raise NodeInputError(node, "mode", f"unknown mode {mode!r}")
        return io.NodeOutput(algo.paste(edited, source.float(), algo.feather(masks, feather)))


# ---------------------------------------------------------------------------------------------
# Ranking

class RankByCLIP(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MC_RankByCLIP",
            display_name="Rank by CLIP",
            category=CATEGORY,
            description="Sorts a batch of edits by CLIP similarity between the masked region and the prompt, best first "
                        "(Blended Latent Diffusion, Sec. 4.4).",
            inputs=[
                MCClip.Input("mc_clip", tooltip="A CLIP model (CLIP Loader (More Control), or another MC_CLIP source)."),
                io.Image.Input("images", tooltip="The decoded edits, a batch."),
                io.Latent.Input("latent", tooltip="The same edits' latents (same batch order), sorted along with the images."),
                io.Mask.Input("mask", tooltip="The edited region, any size: only it is seen by CLIP, as in the paper."),
                io.String.Input("prompt", multiline=True, default="", tooltip="The text the edits should match."),
                io.Int.Input("keep", default=0, min=0, max=4096, tooltip="Keep only the best N (0 = all)."),
                _threshold_input(),
            ],
            outputs=[io.Image.Output(display_name="images"), io.Latent.Output(display_name="latent"),
                     io.String.Output(display_name="scores")],
        )

    @classmethod
    def execute(cls, mc_clip, images, latent, mask, prompt, keep, threshold) -> io.NodeOutput:
        node = "MC_RankByCLIP"
        if not is_mc_clip(mc_clip):
            raise NodeInputError(node, "mc_clip", "needs an object with encode_image and encode_text (an MC_CLIP)")
        if not prompt.strip():
            raise NodeInputError(node, "prompt", "is empty: nothing to rank against")
        batch, height, width = images.shape[:3]
        samples = latent["samples"]
        if samples.shape[0] != batch:
            raise NodeInputError(node, "latent", f"has {samples.shape[0]} latents for {batch} images: give the edits' own latents")
        masks = _masks_for(node, mask, batch, height, width, threshold)
        if not bool(masks.flatten(1).any(1).all()):
            raise NodeInputError(node, "mask", f"is empty (after thresholding at {threshold}) for some image: "
                                 "CLIP would see a black image")
        with torch.no_grad():
            masked = algo.masked_for_ranking(images[..., :3].float(), masks)
            features = torch.cat([mc_clip.encode_image(chunk).float().cpu() for chunk in masked.split(8)])
            text = mc_clip.encode_text([prompt.strip()]).float().cpu()
        similarity, order = algo.rank_by_similarity(features, text[0])
        if keep > 0:
            order = order[:keep]
        out_latent = {**latent, "samples": samples[order]}
        for key in ("noise_mask", "batch_index"):
            value = latent.get(key)
            if isinstance(value, torch.Tensor) and value.shape[0] == batch:
                out_latent[key] = value[order]
            elif isinstance(value, list) and len(value) == batch:
                out_latent[key] = [value[int(i)] for i in order]
        return io.NodeOutput(images[order], out_latent, algo.format_scores(similarity, order.tolist()))


NODES = [ProgressiveMaskShrink, BlendedLatentSampler, BlendedSamplerWrapper, DecoderFineTune, LatentOptimization, PixelBlend, RankByCLIP]
