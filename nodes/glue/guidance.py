"""ComfyUI glue for semantic diffusion guidance (paper 000; the algorithm is nodes/algorithms/sdg.py):
guidance functions as MC_GUIDANCE objects, the post-CFG hook that shifts every sampler's denoised
prediction by σ² ∇F, and noise-aware encoder files (read, written, checked against a MODEL)."""
from __future__ import annotations

import json
import logging
import math
import pathlib
from dataclasses import dataclass, field, replace

import torch

from ..algorithms import sdg as algo
from . import NodeInputError, gradients_enabled, model_family, outside_inference, vae_ratio

__all__ = ["MODE_NOISE_AWARE", "MODE_EXACT", "MODE_FAST", "MODES", "ENCODER_FOLDER", "GuidanceTerm", "Guidance",
           "combine_guidance", "SemanticSettings", "NoiseAwareEncoderFile", "save_noise_aware_encoder",
           "read_encoder_record", "load_noise_aware_encoder", "latent_format_name", "check_encoder_fits",
           "SemanticGuidanceHook", "apply_semantic_guidance", "guidance_hook", "images_from_folder",
           "train_noise_aware_encoder", "encoder_metadata"]

MODE_NOISE_AWARE, MODE_EXACT, MODE_FAST = "noise-aware", "decoded (exact)", "decoded (fast)"
MODES = [MODE_NOISE_AWARE, MODE_EXACT, MODE_FAST]
KINDS = ("text", "content", "structure", "style")


@dataclass
class GuidanceTerm:
    """One guidance function F_k with its scale s_k. `reference` is an IMAGE (BHWC, [0, 1]);
    `text_embedding` (1, D) comes from the MC_CLIP whose image tower the encoder copies."""
    kind: str
    scale: float
    mc_clip: object
    node: str
    text_embedding: torch.Tensor | None = None
    reference: torch.Tensor | None = None
    layers: tuple[int, ...] = ()
    key: int = field(default_factory=lambda: GuidanceTerm._next_key())

    _counter = [0]

    @staticmethod
    def _next_key() -> int:
        GuidanceTerm._counter[0] += 1
        return GuidanceTerm._counter[0]


@dataclass
class Guidance:
    """An MC_GUIDANCE: eq. 10's weighted sum of guidance functions (one or more terms)."""
    terms: list[GuidanceTerm]

    def is_zero(self) -> bool:
        return all(t.scale == 0 for t in self.terms)

    def describe(self) -> str:
        return " + ".join(f"{t.scale:g}·{t.kind}" for t in self.terms)


def combine_guidance(parts: list[tuple[Guidance, float]]) -> Guidance:
    """Eq. 10: the terms of every part, each scale multiplied by its part's weight."""
    return Guidance([replace(t, scale=t.scale * weight) for g, weight in parts for t in g.terms])


@dataclass(frozen=True)
class SemanticSettings:
    mode: str = MODE_NOISE_AWARE
    start_percent: float = 0.0
    end_percent: float = 1.0
    every_n_steps: int = 1
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# Noise-aware encoder files

ENCODER_FOLDER = "more_control_noise_aware"


@dataclass
class NoiseAwareEncoderFile:
    """An MC_NOISE_AWARE_ENCODER: the encoder module, the record it was saved with, its name."""
    encoder: algo.NoiseAwareEncoder
    record: algo.EncoderRecord
    name: str

    def __repr__(self):
        return (f"NoiseAwareEncoder({self.name}: {self.record.latent_format} latents, "
                f"{self.record.latent_channels} channels, from {self.record.trained_from or '?'})")


encoder_metadata = algo.encoder_metadata
save_noise_aware_encoder = algo.save_encoder
read_encoder_record = algo.read_encoder_record


def load_noise_aware_encoder(path, device=None) -> NoiseAwareEncoderFile:
    """Rebuild the encoder from its record (open_clip builds the empty tower) and load the weights in fp32."""
    import safetensors.torch

    from ..clip_models import build_vision_tower

    record = read_encoder_record(path)
    with torch.inference_mode(False):
        encoder = algo.NoiseAwareEncoder(build_vision_tower(record.vision_config), record.latent_channels)
        state = {k: v.float() for k, v in safetensors.torch.load_file(str(path)).items()}
        encoder.load_state_dict(state)
        encoder.requires_grad_(False).eval()
        if device is not None:
            encoder.to(device)
    return NoiseAwareEncoderFile(encoder, record, pathlib.Path(path).name)


def latent_format_name(model_patcher) -> str:
    return type(model_patcher.model.latent_format).__name__


def check_encoder_fits(encoder_file: NoiseAwareEncoderFile, model_patcher, node: str, input_name: str = "noise_aware_encoder"):
    """Refuse an encoder trained for another latent space: channel count, latent format, scale."""
    latent_format = model_patcher.model.latent_format
    record = encoder_file.record
    channels = int(getattr(latent_format, "latent_channels", 4))
    if record.latent_channels != channels:
        raise NodeInputError(node, input_name, f"{encoder_file.name} reads {record.latent_channels}-channel latents but this "
                             f"{model_family(model_patcher)} model's latents have {channels} channels: train an encoder for "
                             "this model's VAE (MC_TrainNoiseAwareEncoder) or use mode 'decoded (fast)'")
    name = type(latent_format).__name__
    scale = float(getattr(latent_format, "scale_factor", 1.0))
    if record.latent_format != name or abs(record.scale_factor - scale) > 1e-4 * max(1.0, abs(scale)):
        raise NodeInputError(node, input_name, f"{encoder_file.name} was trained on {record.latent_format} latents (scale "
                             f"{record.scale_factor:.5g}) but this model uses {name} latents (scale {scale:.5g}): train an "
                             "encoder for this model's VAE (MC_TrainNoiseAwareEncoder) or use mode 'decoded (fast)'")


# ---------------------------------------------------------------------------------------------
# The sampling hook

_GRADIENT_READY: dict = {}


def _has_inference_weights(module) -> bool:
    return isinstance(module, torch.nn.Module) and any(p.is_inference() for p in module.parameters())


def gradient_ready(mc_clip):
    """The MC_CLIP itself, or a shallow copy whose torch module is a deep copy made outside inference
    mode when its weights are inference tensors (a model built or moved inside ComfyUI's executor):
    autograd cannot save those for backward. The copy is made once per MC_CLIP."""
    import copy

    key = id(mc_clip)
    if key in _GRADIENT_READY and _GRADIENT_READY[key][0] is mc_clip:
        return _GRADIENT_READY[key][1]
    ready = mc_clip
    with torch.inference_mode(False):
        if _has_inference_weights(getattr(mc_clip, "model", None)):
            ready = copy.copy(mc_clip)
            ready.model = copy.deepcopy(mc_clip.model).requires_grad_(False)
        vision = getattr(mc_clip, "clip_vision", None)
        if vision is not None and _has_inference_weights(getattr(vision, "model", None)):
            ready = copy.copy(mc_clip)
            ready.clip_vision = copy.copy(vision)
            ready.clip_vision.model = copy.deepcopy(vision.model).to(vision.load_device).requires_grad_(False)
    if len(_GRADIENT_READY) > 8:
        _GRADIENT_READY.clear()
    _GRADIENT_READY[key] = (mc_clip, ready)
    return ready


def clip_features(mc_clip, images: torch.Tensor, layers):
    from ..clip_models import image_features

    return image_features(gradient_ready(mc_clip), images, list(layers))


def _features_needed(terms: list[GuidanceTerm]) -> list[int]:
    return sorted({i for t in terms if t.kind in ("structure", "style") for i in t.layers})


def _term_value(term: GuidanceTerm, embedding, maps: dict, reference) -> torch.Tensor:
    """F_k of every sample given the sample's features and the reference's (emb, maps or grams)."""
    if term.kind == "text":
        text = term.text_embedding.to(embedding.device)
        if text.shape[0] > 1:  # one text per sample
            fitted = algo.fit_batch(text, embedding.shape[0])
            if fitted is None:
                raise NodeInputError(term.node, "text", f"{text.shape[0]} texts fit no batch of {embedding.shape[0]} samples")
            text = fitted
        return algo.text_guidance(embedding, text)
    ref_embedding, ref_maps = reference
    if term.kind == "content":
        return algo.content_guidance(embedding, ref_embedding)
    own = [maps[i] for i in term.layers]
    if term.kind == "structure":
        return algo.structure_guidance(own, [ref_maps[i] for i in term.layers])
    return algo.style_guidance(own, [ref_maps[i] for i in term.layers])


class SemanticGuidanceHook:
    """The post-CFG function: inside the step range, denoised + σ² ∇_x Σ_k s_k F_k, the gradient
    taken with gradients enabled locally, on fp32 clones; outside it, denoised untouched."""

    def __init__(self, guidance: Guidance, settings: SemanticSettings, vae, encoder_file: NoiseAwareEncoderFile | None, node: str):
        self.guidance, self.settings, self.vae, self.encoder_file, self.node = guidance, settings, vae, encoder_file, node
        self.terms = [t for t in guidance.terms if t.scale != 0]
        self.layers = _features_needed(self.terms)
        self._range: dict = {}
        self._decoder = None
        self._references: dict = {}
        self.calls = 0  # how many model evaluations got a gradient (tests, benchmarks)

    # --- when ---------------------------------------------------------------------------------
    def _sigma_range(self, model_sampling):
        key = id(model_sampling)
        if key not in self._range:
            self._range.clear()
            self._range[key] = (float(model_sampling.percent_to_sigma(self.settings.start_percent)),
                                float(model_sampling.percent_to_sigma(self.settings.end_percent)))
        return self._range[key]

    def active(self, sigma: torch.Tensor, model, model_options: dict) -> bool:
        high, low = self._sigma_range(model.model_sampling)
        s = float(sigma.reshape(-1).max())
        if not (low <= s <= high):
            return False
        if self.settings.every_n_steps <= 1:
            return True
        sample_sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        if sample_sigmas is None:
            return True
        sigmas = sample_sigmas.reshape(-1).float().cpu()
        index = int((sigmas - s).abs().argmin())
        inside = torch.nonzero((sigmas <= high * (1 + 1e-6)) & (sigmas >= low), as_tuple=False)
        first = int(inside[0]) if inside.numel() else 0
        return (index - first) % self.settings.every_n_steps == 0

    # --- references ---------------------------------------------------------------------------
    def _fit(self, term: GuidanceTerm, t: torch.Tensor, batch: int) -> torch.Tensor:
        fitted = algo.fit_batch(t, batch)
        if fitted is None:
            raise NodeInputError(term.node, "image", f"{t.shape[0]} reference images fit no batch of {batch} samples "
                                 "(give 1 reference, one per sample, or a number that divides the batch)")
        return fitted

    def _clean_reference(self, term: GuidanceTerm, batch: int, device):
        """Decoded modes: the clean CLIP's features of the reference images, once per run."""
        key = ("clean", term.key, batch, str(device))
        if key not in self._references:
            with torch.no_grad():
                emb, maps = clip_features(term.mc_clip, outside_inference(term.reference), self.layers)
            maps_by_layer = dict(zip(self.layers, maps))
            if term.kind == "style":
                maps_by_layer = {i: algo.gram(m) for i, m in maps_by_layer.items()}
            emb = self._fit(term, emb, batch).to(device)
            maps_by_layer = {i: self._fit(term, m, batch).to(device) for i, m in maps_by_layer.items()}
            self._references = {k: v for k, v in self._references.items() if k[2] == batch}
            self._references[key] = (emb, maps_by_layer)
        return self._references[key]

    def _reference_latent(self, term: GuidanceTerm, model, shape, device) -> torch.Tensor:
        """Noise-aware mode: the reference encoded by the VAE at the sample's size, in the model's latent space."""
        key = ("latent", term.key, tuple(shape), str(device))
        if key not in self._references:
            import comfy.utils

            ratio = vae_ratio(self.vae)
            image = term.reference[..., :3].movedim(-1, 1)
            image = comfy.utils.common_upscale(image, shape[-1] * ratio, shape[-2] * ratio, "bilinear", "center").movedim(1, -1)
            with torch.no_grad():
                latent = self.vae.encode(image)
            latent = model.process_latent_in(latent.to(device)).float()
            self._references[key] = outside_inference(self._fit(term, latent, shape[0]))
        return self._references[key]

    # --- decoding -----------------------------------------------------------------------------
    def _decode(self, model, x0: torch.Tensor) -> torch.Tensor:
        """Differentiable decode of a predicted clean latent to BHWC [0, 1] images, with a float32
        copy of the VAE (the user's VAE untouched), made once per patched model."""
        from ..algorithms.blended import throwaway_copy

        if self._decoder is None or self._decoder[1] != x0.device:
            autoencoder = throwaway_copy(self.vae.first_stage_model, x0.device).requires_grad_(False)
            self._decoder = (autoencoder, x0.device)
        autoencoder = self._decoder[0]
        pixels = autoencoder.decode(model.process_latent_out(x0).float())
        return ((pixels + 1) / 2).clamp(0, 1).movedim(1, -1)

    # --- the gradient -------------------------------------------------------------------------
    def _value_from_images(self, images: torch.Tensor) -> torch.Tensor:
        value = 0.0
        by_clip: dict = {}
        for term in self.terms:
            by_clip.setdefault(id(term.mc_clip), []).append(term)
        for terms in by_clip.values():
            layers = _features_needed(terms)
            emb, maps = clip_features(terms[0].mc_clip, images, layers)
            maps = dict(zip(layers, maps))
            for term in terms:
                reference = self._clean_reference(term, images.shape[0], emb.device) if term.reference is not None else None
                value = value + term.scale * _term_value(term, emb, maps, reference).to(images.device)
        return value

    def _value_noise_aware(self, model, x: torch.Tensor, sigma: torch.Tensor, step_seed: int) -> torch.Tensor:
        encoder = self.encoder_file.encoder
        sampling = model.model_sampling
        sigma = sigma.reshape(-1).float().to(x.device).expand(x.shape[0]) if sigma.numel() == 1 else sigma.reshape(-1).float().to(x.device)
        emb, maps = encoder(sampling.calculate_input(sigma, x), sigma, self.layers)
        maps = dict(zip(self.layers, maps))
        value = 0.0
        for i, term in enumerate(self.terms):
            reference = None
            if term.reference is not None:
                # eq. 7-9: the reference re-noised to this step's level (fresh, seeded noise), same encoder
                latent = self._reference_latent(term, model, x.shape, x.device)
                generator = torch.Generator().manual_seed(step_seed * 1009 + i)
                noise = torch.randn(latent.shape, generator=generator).to(latent)
                with torch.no_grad():
                    noisy = sampling.noise_scaling(sigma, noise, latent)
                    ref_emb, ref_maps = encoder(sampling.calculate_input(sigma, noisy), sigma, self.layers)
                ref_maps = dict(zip(self.layers, ref_maps))
                if term.kind == "style":
                    ref_maps = {k: algo.gram(m) for k, m in ref_maps.items()}
                reference = (ref_emb, ref_maps)
            value = value + term.scale * _term_value(term, emb, maps, reference)
        return value

    def step_seed(self, sigma: torch.Tensor) -> int:
        """The seed of this step's reference noise: the node's seed and the noise level (reproducible runs)."""
        return self.settings.seed + int(round(float(sigma.reshape(-1)[0]) * 1e4))

    def gradient(self, args) -> torch.Tensor:
        import comfy.samplers

        model, sigma, mode = args["model"], outside_inference(args["sigma"]).float(), self.settings.mode
        if mode == MODE_NOISE_AWARE:
            x = outside_inference(args["input"]).float().requires_grad_(True)
            value = self._value_noise_aware(model, x, sigma, self.step_seed(sigma))
        elif mode == MODE_FAST:
            # The gradient at the clean prediction, carried to x_t by the denoiser's Jacobian for
            # unit-variance Gaussian data, d x0 / d x_t = 1 / (1 + σ²) (Tweedie): no UNet backward.
            x = outside_inference(args["denoised"]).float().requires_grad_(True)
            value = self._value_from_images(self._decode(model, x))
            (grad,) = torch.autograd.grad(value.sum(), x)
            return grad * algo.gaussian_denoiser_jacobian(sigma.to(grad.device), grad.dim())
        else:
            x = outside_inference(args["input"]).float().requires_grad_(True)
            # the positive prediction again, this time recording the UNet's graph (ComfyUI's own call)
            try:
                x0 = comfy.samplers.calc_cond_batch(model, [args["cond"]], x, sigma, args["model_options"])[0]
            except RuntimeError as e:
                if "Inference tensors" not in str(e):
                    raise
                raise NodeInputError(self.node, "mode", "'decoded (exact)' needs the UNet's weights outside inference "
                                     "mode, and this model was loaded inside it; use 'decoded (fast)' or "
                                     "'noise-aware'") from None
            value = self._value_from_images(self._decode(model, x0.float()))
            try:
                (grad,) = torch.autograd.grad(value.sum(), x)
            except RuntimeError as e:
                if "inplace operation" not in str(e):
                    raise
                # ComfyUI's Flux blocks write into their activations in place: no backward through them
                raise NodeInputError(self.node, "mode", f"'decoded (exact)' takes the gradient through the model, and this "
                                     f"{type(getattr(model, 'model_config', model)).__name__} model's forward pass changes its tensors in place, so it "
                                     "cannot be differentiated; use 'decoded (fast)' or 'noise-aware'") from None
            return grad
        (grad,) = torch.autograd.grad(value.sum(), x)
        return grad

    def __call__(self, args):
        denoised = args["denoised"]
        if not self.terms or not self.active(args["sigma"], args["model"], args["model_options"]):
            return denoised
        with gradients_enabled():
            grad = self.gradient(args)
        self.calls += 1
        return algo.guided_denoised(denoised, args["sigma"].to(denoised.device), grad.to(denoised.device))


def apply_semantic_guidance(model_patcher, guidance: Guidance, settings: SemanticSettings, vae=None,
                            encoder_file: NoiseAwareEncoderFile | None = None, node: str = "MC_ApplySemanticGuidance"):
    """A clone of the MODEL whose every sampler is steered by the guidance (a post-CFG hook, so it
    composes with CFG, cfg 1 and other post-CFG patches such as segmentation-free guidance).
    With every scale 0 the clone carries no hook at all: sampling is the unpatched model's."""
    patched = model_patcher.clone()
    if guidance.is_zero():
        return patched
    if settings.mode == MODE_NOISE_AWARE:
        if encoder_file is None:
            raise NodeInputError(node, "noise_aware_encoder", "mode 'noise-aware' needs a noise-aware encoder (load one, "
                                 "train one with MC_TrainNoiseAwareEncoder, or use mode 'decoded (fast)')")
        check_encoder_fits(encoder_file, model_patcher, node)
        stages = encoder_file.encoder.stage_count()
        for t in guidance.terms:
            if any(i >= stages for i in t.layers):
                raise NodeInputError(t.node, "layers", f"the noise-aware encoder has layers 0 to {stages - 1}")
    needs_vae = settings.mode != MODE_NOISE_AWARE or any(t.reference is not None for t in guidance.terms)
    if needs_vae and vae is None:
        why = "image guidance encodes the reference with it" if settings.mode == MODE_NOISE_AWARE else \
            f"mode '{settings.mode}' decodes the predicted image with it"
        raise NodeInputError(node, "vae", f"connect the model's VAE: {why}")
    if vae is not None and settings.mode != MODE_NOISE_AWARE:
        vae_channels = int(getattr(vae, "latent_channels", 4))
        model_channels = int(getattr(model_patcher.model.latent_format, "latent_channels", 4))
        if vae_channels != model_channels:
            raise NodeInputError(node, "vae", f"the VAE makes {vae_channels}-channel latents but the model's have {model_channels}")
    hook = SemanticGuidanceHook(guidance, settings, vae, encoder_file, node)
    if encoder_file is not None and settings.mode == MODE_NOISE_AWARE:
        import comfy.model_management

        with torch.inference_mode(False):  # moved inside inference mode, its weights could not be differentiated
            encoder_file.encoder.to(comfy.model_management.get_torch_device())
    patched.set_model_sampler_post_cfg_function(hook)
    logging.info("[More Control] semantic guidance (%s, %s) on a clone of the model", settings.mode, guidance.describe())
    return patched


def guidance_hook(model_patcher) -> SemanticGuidanceHook | None:
    """The semantic guidance hook on a patched MODEL, if any (tests and benchmarks count its calls)."""
    for fn in model_patcher.model_options.get("sampler_post_cfg_function", []):
        if isinstance(fn, SemanticGuidanceHook):
            return fn
    return None


# ---------------------------------------------------------------------------------------------
# Training a noise-aware encoder (MC_TrainNoiseAwareEncoder)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def images_from_folder(folder, resolution: int) -> torch.Tensor:
    """Every image of a folder, RGB, shorter side resized to `resolution` and centre-cropped: BHWC [0, 1]."""
    import numpy as np
    from PIL import Image, ImageOps

    folder = pathlib.Path(folder).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder} has no png/jpg/webp images")
    out = []
    for path in files:
        with Image.open(path) as im:
            im = ImageOps.fit(ImageOps.exif_transpose(im).convert("RGB"), (resolution, resolution), Image.BICUBIC)
            out.append(torch.from_numpy(np.asarray(im).copy()).float() / 255.0)
    return torch.stack(out)


def _square(images: torch.Tensor, resolution: int) -> torch.Tensor:
    import comfy.utils

    if images.shape[1] == resolution and images.shape[2] == resolution:
        return images
    return comfy.utils.common_upscale(images.movedim(-1, 1), resolution, resolution, "bicubic", "center").movedim(1, -1).clamp(0, 1)


def _loss_curve_image(losses: list[tuple[int, float]], path: pathlib.Path, title: str) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    from ...training.common import save_loss_curve

    save_loss_curve([(s, v) for s, v in losses if math.isfinite(v)], path, title=title)
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).float().div(255.0)[None]


def _clip_pixels(mc_clip, images: torch.Tensor) -> torch.Tensor:
    """The MC_CLIP's own preprocessing of BHWC [0, 1] images (what its pixel stem reads)."""
    from ..clip_models import preprocess

    if callable(getattr(mc_clip, "preprocess", None)):
        return mc_clip.preprocess(images)
    return preprocess(images, mc_clip.image_size, mc_clip.mean, mc_clip.std)


def train_noise_aware_encoder(mc_clip, model_patcher, vae, pictures: list[torch.Tensor], path, steps: int,
                              batch_size: int, resolution: int, lr: float, seed: int, resume: bool, node: str,
                              checkpoint_every: int = 200, warmup_steps: int | None = None,
                              alignment_weight: float = 0.0) -> dict:
    """The self-supervised fine-tune on the user's images; returns {"encoder", "loss_curve", "info", "losses"}.
    Latents and the frozen CLIP's embeddings are computed once; each step noises a random batch at
    random levels of the model's own schedule."""
    import comfy.model_management
    import comfy.utils

    from ..clip_models import vision_config

    path = pathlib.Path(path)
    warmup_steps = min(200, max(1, steps // 4)) if warmup_steps is None else warmup_steps
    checkpoint = path.with_name(path.stem + ".checkpoint.safetensors")
    device = comfy.model_management.get_torch_device()
    sampling = model_patcher.get_model_object("model_sampling")
    latent_format = model_patcher.model.latent_format
    try:
        config = vision_config(mc_clip)
    except TypeError as e:
        raise NodeInputError(node, "mc_clip", f"cannot copy this CLIP's image tower ({e}); load an open_clip model "
                             "with CLIP Loader (More Control)") from None
    with gradients_enabled():
        images = torch.cat([_square(outside_inference(p).float(), resolution) for p in pictures])
        if images.shape[0] < 2:
            raise NodeInputError(node, "images", "the contrastive loss needs at least 2 training images")
        batch_size = min(batch_size, images.shape[0])
        clean, latents = [], []
        with torch.no_grad():
            for chunk in images.split(16):
                clean.append(mc_clip.encode_image(chunk).float().cpu())
                latents.append(model_patcher.model.process_latent_in(vae.encode(chunk).float()).cpu())
        clean, latents = torch.cat(clean).clone(), torch.cat(latents).clone()
        if latents.shape[1] != int(getattr(latent_format, "latent_channels", latents.shape[1])):
            raise NodeInputError(node, "vae", f"the VAE makes {latents.shape[1]}-channel latents but the model's have "
                                 f"{latent_format.latent_channels}")
        record = algo.EncoderRecord(vision_config=config, latent_channels=int(latents.shape[1]),
                                    latent_format=type(latent_format).__name__,
                                    scale_factor=float(getattr(latent_format, "scale_factor", 1.0)),
                                    trained_from=str(getattr(mc_clip, "name", type(mc_clip).__name__)))
        encoder = algo.NoiseAwareEncoder(mc_clip.model.visual, record.latent_channels)
        done, losses = 0, []
        if resume and checkpoint.exists():
            import safetensors.torch

            old = read_encoder_record(checkpoint)
            if (old.latent_channels, old.latent_format, old.vision_config) != (record.latent_channels, record.latent_format, record.vision_config):
                raise NodeInputError(node, "resume", f"{checkpoint.name} was trained for another CLIP or latent format; "
                                     "turn resume off or choose another name")
            encoder.load_state_dict({k: v.float() for k, v in safetensors.torch.load_file(str(checkpoint)).items()})
            from safetensors import safe_open

            with safe_open(str(checkpoint), framework="pt") as f:
                meta = f.metadata()
            done = int(meta.get("steps_done", 0))
            losses = [tuple(x) for x in json.loads(meta.get("losses", "[]"))]
        encoder.to(device).requires_grad_(True)
        optimizer = algo.make_optimizer(encoder, lr=lr)
        generator = torch.Generator().manual_seed(int(seed) + done)
        table = getattr(sampling, "sigmas", None)
        if done == 0 and warmup_steps > 0:
            stem_optimizer = torch.optim.AdamW(encoder.stem.parameters(), lr=1e-3, weight_decay=0.0)
            sigma0 = float(table[0]) if table is not None else float(sampling.sigma_min)
            for _ in range(warmup_steps):
                comfy.model_management.throw_exception_if_processing_interrupted()
                index = torch.randperm(latents.shape[0], generator=generator)[:batch_size]
                with torch.no_grad():
                    pixels = _clip_pixels(mc_clip, images[index])
                    target = algo.pixel_stem_features(mc_clip.model.visual, pixels)
                clean_input = sampling.calculate_input(torch.full((len(index),), sigma0), latents[index]).to(device)
                algo.stem_warmup_step(encoder, stem_optimizer, clean_input, target.to(device), sigma0)
        bar = comfy.utils.ProgressBar(max(steps - done, 1))
        for step in range(done, steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            index = torch.randperm(latents.shape[0], generator=generator)[:batch_size]
            sigmas = algo.sample_sigmas(batch_size, table, float(sampling.sigma_min), float(sampling.sigma_max), generator)
            noise = torch.randn(latents[index].shape, generator=generator)
            z, sigmas, noise = latents[index].to(device), sigmas.to(device), noise.to(device)
            noisy_input = sampling.calculate_input(sigmas, sampling.noise_scaling(sigmas, noise, z))
            losses.append((step + 1, algo.training_step(encoder, optimizer, noisy_input, sigmas, clean[index].to(device),
                                                               alignment_weight=alignment_weight)))
            bar.update(1)
            if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                save_noise_aware_encoder(encoder, record, checkpoint, fp16=False,
                                         extra={"steps_done": step + 1, "losses": json.dumps(losses)})
        encoder.requires_grad_(False).eval()
        save_noise_aware_encoder(encoder, record, path, fp16=True)
        save_noise_aware_encoder(encoder, record, checkpoint, fp16=False, extra={"steps_done": max(steps, done), "losses": json.dumps(losses)})
    finite = [v for _, v in losses if math.isfinite(v)][-20:]
    final = sum(finite) / max(len(finite), 1) if finite else float("nan")
    (path.with_suffix(".json")).write_text(json.dumps({
        "steps": max(steps, done), "batch_size": batch_size, "lr": lr, "weight_decay": 1e-3, "seed": seed,
        "alignment_weight": alignment_weight,
        "stem_warmup_steps": warmup_steps if done == 0 else 0,
        "images": int(images.shape[0]), "resolution": resolution, "final_loss": final,
        "record": encoder_metadata(record), "loss_history": [[s, round(v, 5)] for s, v in losses[:: max(1, len(losses) // 2000)]],
    }, indent=2) + "\n")
    curve = _loss_curve_image(losses, path.with_name(path.stem + "_loss.png"), f"{path.stem}: contrastive loss per step")
    info = f"{path} after {max(steps, done)} steps on {images.shape[0]} images, final loss {final:.4f}"
    return {"encoder": NoiseAwareEncoderFile(encoder, record, path.name), "loss_curve": curve, "info": info, "losses": losses}
