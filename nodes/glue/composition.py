"""ComfyUI glue for turn-by-turn editing of a user's MODEL/CLIP/VAE (MC_IterativeEdit): one turn is
CLIPTextEncode + VAEEncode + a sampler + VAEDecode, with the blended sampler of glue.sampling when
the turn has a mask and ComfyUI's own KSampler path (an image-to-image pass) when it has none. The
loop and the paste-back are plain torch in algorithms/composition.py."""
from __future__ import annotations

import torch

from ..algorithms import composition as comp_algo
from . import vae_ratio
from .sampling import blended_sample

__all__ = ["TURN_EVENT", "encode_text", "TurnEditor", "turn_reporter", "ComposerBundle", "load_composer",
           "compose_turn"]

TURN_EVENT = "more_control.turn"  # the page extension draws each finished turn on the node


def encode_text(clip, text: str):
    """CLIPTextEncode's own path (tokenize, then encode with schedule support)."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


class TurnEditor:
    """`edit_turn(turn, reference, mask)` for algorithms.composition.iterate_edits on a user's models.
    The reference (BHWC) is encoded, sampled with the turn's instruction and decoded back to the
    reference's size: an image whose sides are not multiples of the VAE's ratio is edited in the
    centred crop VAE Encode takes, and the border outside the crop stays the reference's."""

    def __init__(self, model, vae, positives: list, negative, seed: int, steps: int, cfg: float, sampler_name: str,
                 scheduler: str, denoise: float):
        self.model, self.vae, self.positives, self.negative = model, vae, positives, negative
        self.seed, self.steps, self.cfg = int(seed), int(steps), float(cfg)
        self.sampler_name, self.scheduler, self.denoise = sampler_name, scheduler, float(denoise)

    def __call__(self, turn: int, reference: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        import comfy.sample

        ratio = vae_ratio(self.vae)
        top, left, h, w = comp_algo.crop_box(reference.shape[1], reference.shape[2], ratio)
        latent = self.vae.encode(reference[:, top:top + h, left:left + w, :3])
        seed = self.seed + turn
        positive = self.positives[turn]
        if mask is not None:
            cells = comp_algo.latent_mask(mask[:, top:top + h, left:left + w], ratio).to(latent.device)
            samples = blended_sample(self.model, positive, self.negative, latent, cells, seed, self.steps, self.cfg,
                                     self.sampler_name, self.scheduler, self.denoise, True)
        else:
            latent = comfy.sample.fix_empty_latent_channels(self.model, latent)
            noise = comfy.sample.prepare_noise(latent, seed)
            samples = comfy.sample.sample(self.model, noise, self.steps, self.cfg, self.sampler_name, self.scheduler,
                                          positive, self.negative, latent, denoise=self.denoise, seed=seed,
                                          callback=self._preview(), disable_pbar=True)
        decoded = self.vae.decode(samples)[..., :3].to(reference.device, reference.dtype)
        if decoded.shape[1:3] == reference.shape[1:3]:
            return decoded
        full = reference.clone()
        full[:, top:top + h, left:left + w] = decoded[:, :h, :w]
        return full

    def _preview(self):
        import latent_preview

        return latent_preview.prepare_callback(self.model, self.steps)


def turn_reporter(node_id: str | None, turns: int):
    """A progress bar over the turns that also sends each finished turn to the page (a small preview
    the extension web/more_control_turns.js draws as a strip on the node) and lets the user cancel."""
    import comfy.model_management
    import comfy.utils

    bar = comfy.utils.ProgressBar(turns)

    def on_turn(turn: int, image: torch.Tensor):
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update(1)
        _send_turn(node_id, turn, turns, image)

    return on_turn


def _send_turn(node_id, turn: int, turns: int, image: torch.Tensor) -> None:
    try:
        import base64
        import io

        import numpy as np
        from PIL import Image
        from server import PromptServer
    except Exception:  # no server (scripts, benchmarks)
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is None or node_id is None:
        return
    pixels = (image[0, ..., :3].clamp(0, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(pixels)
    picture.thumbnail((128, 128))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    instance.send_sync(TURN_EVENT, {"node": str(node_id), "turn": turn, "turns": turns,
                                    "image": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()},
                       getattr(instance, "client_id", None))


# ---------------------------------------------------------------------------------------------
# The shapes-world CDD-ICM composer (MC_CompositionModelLoader / MC_ComposeTurn / MC_IterativeComposition)

class ComposerBundle:
    """What MC_COMPOSER carries: the composer network, the shapes-world VAE (its latent space), the
    tokenizer, the schedule, and whether the composer's weights are trained."""

    def __init__(self, composer, vae, scale_factor: float, trained: bool, source: str):
        import open_clip

        from ..algorithms import cdd_icm
        from ..shapes_world import models

        self.composer, self.vae, self.scale_factor, self.trained, self.source = composer, vae, scale_factor, trained, source
        self.schedule = cdd_icm.Schedule(cdd_icm.scaled_linear_betas(1000))
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=models.CLIP_TEXT_CFG["context_length"])

    def __repr__(self):
        return f"ComposerBundle({self.source}, trained={self.trained})"


_COMPOSERS: dict = {}


def load_composer(weights: str, seed: int = 0) -> ComposerBundle:
    """The composer from models/shapes_world/composer.safetensors ('trained'), or the untrained composer
    (the shapes-world encoders and UNet with zero-initialised extras: it ignores the reference and the
    fusion until trained). Cached per file state."""
    import logging

    import comfy.model_management

    from ..shapes_world import composer as composer_mod
    from ..shapes_world import models

    path = models.WEIGHTS_DIR / composer_mod.COMPOSER_FILE
    key = (weights, seed, path.stat().st_mtime if path.exists() else None)
    if key not in _COMPOSERS:
        _COMPOSERS.clear()
        bundle = models.load_bundle("trained", seed=seed)
        # built outside ComfyUI's inference mode: ICM guidance differentiates through the noisy encoder,
        # which inference-mode parameters would refuse
        with torch.inference_mode(False):
            net = composer_mod.build_composer(models.WEIGHTS_DIR, seed=seed)
        trained = weights == "trained" and path.exists()
        if trained:
            with torch.inference_mode(False):
                composer_mod.load_shipped_state(net, models.load_weights(path))
            source = str(path)
        else:
            source = "UNTRAINED composer (shapes-world encoders and UNet, zero-initialised extras)"
            logging.warning("[More Control] composer: %s%s", source, "" if weights != "trained" else f"; no {path}")
        net = net.to(comfy.model_management.get_torch_device()).eval().requires_grad_(False)
        scale = float(models.read_record(path).get("scale_factor", bundle["scale_factor"])) if trained else bundle["scale_factor"]
        _COMPOSERS[key] = ComposerBundle(net, bundle["vae"], scale, trained, source)
    return _COMPOSERS[key]


def compose_turn(bundle: ComposerBundle, reference: torch.Tensor, instruction: str, seed: int, steps: int, cfg: float,
                 icm_scale: float) -> torch.Tensor:
    """One CDD-ICM turn: the reference IMAGE (BHWC) and the instruction -> the target IMAGE. Deterministic
    DDIM over `steps` uniformly spaced steps with classifier-free guidance (eq. 15, c -> 0 for the
    unconditional pass) and ICM guidance (eq. 14, the noisy encoder's similarity gradient)."""
    import comfy.model_management

    from ..algorithms import cdd_icm
    from . import gradients_enabled

    net, device = bundle.composer, next(bundle.composer.parameters()).device
    batch = reference.shape[0]
    reference = reference[..., :3].to(device, torch.float32)
    ref_latent = bundle.vae.encode(reference).to(device, torch.float32) * bundle.scale_factor
    tokens = bundle.tokenizer([instruction] * batch).to(device)
    condition, context = net.condition(reference, tokens)
    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(ref_latent.shape, generator=generator).to(device)

    def eps_fn(x, t):
        if cfg == 1.0:
            return net.denoise(x, t, ref_latent, condition, context)[:, :x.shape[1]]
        both = net.denoise(torch.cat([x, x]), torch.cat([t, t]), torch.cat([ref_latent, ref_latent]),
                           torch.cat([condition, torch.zeros_like(condition)]), torch.cat([context, context]))
        cond, uncond = both[:, :x.shape[1]].chunk(2)
        return cdd_icm.cfg_eps(cond, uncond, cfg)

    def similarity_grad(x, t):
        with gradients_enabled():
            xg = x.detach().clone().requires_grad_(True)
            sim = torch.nn.functional.cosine_similarity(condition.detach().clone(), net.noisy_embedding(xg), dim=-1)
            return torch.autograd.grad(sim.sum(), xg)[0]

    def on_step(i, n):
        comfy.model_management.throw_exception_if_processing_interrupted()

    latent = cdd_icm.ddim_sample(bundle.schedule, eps_fn, noise, steps, similarity_grad if icm_scale > 0 else None,
                                 psi=icm_scale, on_step=on_step)
    image = bundle.vae.decode(latent / bundle.scale_factor)[..., :3]
    return image.to(comfy.model_management.intermediate_device()).clamp(0, 1)
