"""ComfyUI glue for turn-by-turn editing of a user's MODEL/CLIP/VAE (MC_IterativeEdit): one turn is
CLIPTextEncode + VAEEncode + a sampler + VAEDecode, with the blended sampler of glue.sampling when
the turn has a mask and ComfyUI's own KSampler path (an image-to-image pass) when it has none. The
loop and the paste-back are plain torch in algorithms/composition.py."""
from __future__ import annotations

import torch

from ..algorithms import composition as comp_algo
from .sampling import blended_sample

__all__ = ["TURN_EVENT", "encode_text", "vae_ratio", "TurnEditor", "turn_reporter"]

TURN_EVENT = "more_control.turn"  # the page extension draws each finished turn on the node


def encode_text(clip, text: str):
    """CLIPTextEncode's own path (tokenize, then encode with schedule support)."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def vae_ratio(vae) -> int:
    return int(vae.spacial_compression_encode())


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
