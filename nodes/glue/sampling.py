"""ComfyUI glue for masked sampling and for optimising parts of a VAE: the denoise-mask hook of
progressive mask shrinking, the blended sampler (a ComfyUI Sampler that runs an inner k-diffusion
sampler step by step), progress bars that can be cancelled, and throw-away VAE copies."""
from __future__ import annotations

import torch

import comfy.samplers

from ..algorithms import blended as algo


def sampler_names() -> list[str]:
    return comfy.samplers.KSampler.SAMPLERS


def scheduler_names() -> list[str]:
    return comfy.samplers.KSampler.SCHEDULERS


def fix_empty_latent_channels(model, latent: torch.Tensor) -> torch.Tensor:
    import comfy.sample

    return comfy.sample.fix_empty_latent_channels(model, latent)


class ShrinkMaskFunction:
    """The `denoise_mask_function` installed by MC_ProgressiveMaskShrink. ComfyUI calls it before
    every model evaluation of a masked sampling run with (sigma, latent mask, {"model", "sigmas"})
    and uses the mask it returns for that evaluation. A function installed earlier on the model
    (e.g. Differential Diffusion's) runs first."""

    def __init__(self, schedule: algo.ShrinkSchedule, threshold: float, previous=None):
        self.schedule, self.threshold, self.previous = schedule, threshold, previous

    def __call__(self, sigma, denoise_mask, extra_options):
        if self.previous is not None:
            denoise_mask = self.previous(sigma, denoise_mask, extra_options)
        sigmas = extra_options["sigmas"]
        step = algo.step_index(float(torch.as_tensor(sigma).reshape(-1)[0]), sigmas)
        kernel = self.schedule.kernel_of_step(step, len(sigmas) - 1)
        return algo.shrink_mask(denoise_mask, kernel, self.threshold)


class BlendedSampler(comfy.samplers.Sampler):
    """A ComfyUI sampler that runs an inner k-diffusion sampler one step at a time and, after each
    step t -> t_prev, blends `z = m * z + (1 - m) * noise(z_init, t_prev)` (Alg. 1; ALGORITHMS.md's
    recommended order), with fresh background noise per step or ComfyUI's fixed noise, and the
    clean source latent after the final step. The mask of each step comes from the model's
    `denoise_mask_function` when one is installed (progressive shrinking), so both compose.

    Running one step per call means multistep samplers (dpmpp_2m, lms, deis, ipndm, uni_pc) lose their
    history and act as their first-order form; ancestral/SDE samplers get a new seed per step."""

    def __init__(self, inner, fresh_noise: bool, seed: int | None, step_callback=None, threshold: float | None = None,
                 batch_index=None):
        self.inner, self.fresh_noise = inner, fresh_noise
        self.seed = None if seed is None else int(seed)  # None: the sampling run's seed (SamplerCustomAdvanced's noise seed)
        self.batch_index = batch_index  # the latent's batch_index: fresh noise per batch position, as prepare_noise
        self.threshold = threshold
        self.step_callback = step_callback
        self.final_mask = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        if denoise_mask is None:
            raise ValueError("MC_BlendedSampler: the latent has no noise mask (use Set Latent Noise Mask before sampling)")
        seed = self.seed if self.seed is not None else int(extra_args.get("seed") or 0)
        if self.threshold is not None:
            denoise_mask = algo.binarize(denoise_mask, self.threshold)
        model_sampling = model_wrap.inner_model.model_sampling
        extra_args["denoise_mask"] = denoise_mask
        model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
        model_k.latent_image = latent_image
        noises = algo.NoiseSource(noise, seed, self.fresh_noise, self.batch_index)
        x = model_sampling.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))
        mask_function = extra_args["model_options"].get("denoise_mask_function")
        steps = len(sigmas) - 1
        mask = denoise_mask
        for i in range(steps):
            # The model input of step i sees the background noised with this step's noise: the same
            # tensor the blend after step i-1 used, so the core's pre-call blend changes nothing there.
            model_k.noise = noises.for_step(i)
            step_args = dict(extra_args, seed=seed + i)
            step_callback = None
            if callback is not None:
                step_callback = (lambda d, i=i: callback(i, d["denoised"], d["x"], steps))
            # a copy: some samplers (uni_pc) overwrite a final sigma of 0 in place, which would turn the
            # exact-source blend after the last step into a blend at that sigma
            x = self.inner.sampler_function(model_k, x, sigmas[i:i + 2].clone(), extra_args=step_args, callback=step_callback,
                                            disable=True, **self.inner.extra_options)
            if mask_function is not None:
                mask = mask_function(sigmas[i:i + 1].expand(x.shape[0]), denoise_mask, {"model": model_wrap, "sigmas": sigmas})
            if float(sigmas[i + 1]) == 0.0:
                background = latent_image
            else:
                background = model_sampling.noise_scaling(sigmas[i + 1], noises.for_step(i + 1), latent_image)
            x = algo.blend_background(x, mask, background)
            if self.step_callback is not None:
                self.step_callback(i, x, mask)
        self.final_mask = mask
        return model_sampling.inverse_noise_scaling(sigmas[-1], x)


def blended_sample(model, positive, negative, source: torch.Tensor, latent_mask: torch.Tensor, seed: int, steps: int,
                   cfg: float, sampler_name: str, scheduler: str, denoise: float, fresh_noise: bool, batch_index=None):
    """KSampler's path (same sigmas, noise and preview) with the BlendedSampler inside; returns the
    edited latent whose background is `source` bit for bit."""
    import comfy.model_management
    import comfy.sample
    import comfy.utils
    import latent_preview

    batch = source.shape[0]
    ksampler = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                       scheduler=scheduler, denoise=denoise, model_options=model.model_options)
    sigmas = ksampler.sigmas
    if sigmas.numel() < 2:
        return source.clone()
    noise = comfy.sample.prepare_noise(source, seed, batch_index)
    sampler = BlendedSampler(comfy.samplers.sampler_object(sampler_name), fresh_noise, seed,  # mask already binary
                             batch_index=batch_index)
    preview = latent_preview.prepare_callback(model, sigmas.numel() - 1)
    samples = comfy.samplers.sample(model, noise, positive, negative, cfg, model.load_device, sampler, sigmas,
                                    model_options=model.model_options, latent_image=source,
                                    denoise_mask=latent_mask[:, None], callback=preview,
                                    disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    samples = samples.to(comfy.model_management.intermediate_device())
    # The sampler works on the model's scaled latent (process_latent_in/out), whose round trip is not
    # exact in floating point: paste the caller's own latent outside the final mask, bit for bit.
    final = sampler.final_mask.to(samples.device)
    final = comfy.utils.repeat_to_batch_size(final, batch)
    samples = torch.where(final > 0, samples, source.to(samples.dtype))
    return samples


def progress_callback(total_steps: int):
    """A ComfyUI progress bar over all optimisation steps of a node, that also lets the user cancel."""
    import comfy.model_management
    import comfy.utils

    bar = comfy.utils.ProgressBar(total_steps)

    def on_step(_):
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update(1)

    return on_step


def decoder_copy(vae):
    """A throw-away float32 copy of the VAE's autoencoder (never the user's), its decode function,
    and the parameters the paper fine-tunes (the decoder's)."""
    import comfy.model_management

    device = vae.device if vae.device is not None else comfy.model_management.get_torch_device()
    model = algo.throwaway_copy(vae.first_stage_model, device)
    model.requires_grad_(False)
    decoder = getattr(model, "decoder", model)
    params = list(decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    return model, model.decode, params, device
