"""Train the shapes-world text-to-image UNet: ComfyUI's own SD1-style UNetModel (small dims),
eps-prediction on the SD1 discrete schedule (scaled-linear betas 0.00085..0.012, 1000 steps;
diffusers' DDPMScheduler adds the noise), conditioned on the token embeddings the converted
ComfyUI text encoder gives (exactly CLIPTextEncode's output, frozen), with caption dropout to
the empty prompt's encoding so classifier-free guidance works, and an EMA of the weights
(diffusers' EMAModel). Latents are the trained VAE's posterior means times its scale factor.

Needs vae.safetensors and clip.safetensors in --models (falls back to random weights with a
warning, which is only useful for testing the command).

    python -m training.train_unet --minutes 90 --out models/shapes_world
"""
from __future__ import annotations

import importlib
import logging

import numpy as np
import torch

from . import comfy_env, common


class LatentBuffer:
    """A growing pool of (latent, text embedding, caption) made from fresh scenes: a few new
    scenes are encoded every step (the VAE encoder is the expensive part), training batches
    are drawn from the whole pool."""

    def __init__(self, capacity: int, device):
        self.capacity, self.device = capacity, device
        self.latents: list[torch.Tensor] = []
        self.context: list[torch.Tensor] = []
        self.captions: list[str] = []
        self.next = 0

    def __len__(self):
        return len(self.latents)

    def add(self, latents, context, captions):
        for z, c, t in zip(latents, context, captions):
            if len(self.latents) < self.capacity:
                self.latents.append(z)
                self.context.append(c)
                self.captions.append(t)
            else:
                i = self.next % self.capacity
                self.latents[i], self.context[i], self.captions[i] = z, c, t
                self.next += 1

    def sample(self, rng: np.random.Generator, n: int):
        idx = rng.integers(0, len(self.latents), size=n)
        return (torch.stack([self.latents[i] for i in idx]).to(self.device).float(),
                torch.stack([self.context[i] for i in idx]).to(self.device).float())


def encode_text(clip, captions: list[str]) -> torch.Tensor:
    """CLIPTextEncode's own path for each caption: (B, 77, width)."""
    return torch.cat([clip.encode_from_tokens_scheduled(clip.tokenize(t))[0][0] for t in captions]).float()


def main(argv=None):
    p = common.base_parser(__doc__.splitlines()[0], steps=1000000, batch=16, lr=3e-4)
    p.add_argument("--models", type=str, default=None, help="folder with vae/clip weights (default: --out)")
    p.add_argument("--cond-drop", type=float, default=0.1, help="caption dropout to the empty prompt")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--pool", type=int, default=12000, help="latent pool capacity")
    p.add_argument("--initial", type=int, default=256, help="scenes encoded before the first step")
    p.add_argument("--fresh", type=int, default=4, help="new scenes encoded per step")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--sample-steps", type=int, default=20, help="sampler steps for the final sample grid")
    p.add_argument("--sample-prompts", type=int, default=8, help="held-out captions sampled for the final grid")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.batch, args.initial, args.fresh, args.sample_steps = min(args.steps, 2), 2, 4, 1, 1
    comfy_env.setup()
    world = importlib.import_module("mc_shapes_world.world")
    models = importlib.import_module("mc_shapes_world.models")
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    run = common.Run("unet", args)
    src = common.pathlib.Path(args.models) if args.models else run.out
    have = models.weights_status(src)

    ae = models.build_autoencoder(seed=args.seed)
    scale = models.DEFAULT_SCALE_FACTOR
    if have["vae"]:
        ae.load_state_dict(models.load_weights(src / models.VAE_FILE))
        scale = float(models.read_record(src / models.VAE_FILE).get("scale_factor", scale))
    else:
        logging.warning("[unet] no trained VAE in %s: UNTRAINED random VAE (testing only)", src)
    ae = ae.to(run.device).eval().requires_grad_(False)
    oc = models.build_open_clip(models.load_weights(src / models.CLIP_FILE) if have["clip"] else None, seed=args.seed + 1)
    if not have["clip"]:
        logging.warning("[unet] no trained CLIP in %s: UNTRAINED random text encoder (testing only)", src)
    clip = models.build_comfy_clip(oc)
    empty = encode_text(clip, [""])[0]

    base = models.build_base_model(scale, seed=args.seed + 2)
    if run.resume_from(models.UNET_FILE):  # continues from the saved (EMA) weights
        base.diffusion_model.load_state_dict(models.load_weights(run.out / models.UNET_FILE))
    unet = base.diffusion_model.to(run.device).train()
    ema = EMAModel(unet.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=3 / 4)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                beta_schedule="scaled_linear", prediction_type="epsilon")
    # the schedule is ComfyUI's own SD1 schedule (checked here, and in the tests)
    comfy_sigmas = base.model_sampling.sigmas.float().cpu()
    ours = ((1 - noise_sched.alphas_cumprod) / noise_sched.alphas_cumprod).sqrt().float()
    assert torch.allclose(ours, comfy_sigmas, rtol=1e-4), "noise schedule differs from ComfyUI's"

    rng = np.random.default_rng(args.seed)
    pool = LatentBuffer(args.pool, run.device)

    @torch.no_grad()
    def add_scenes(n):
        x, captions = common.world_batch(world, rng, n)
        mean = ae.quant_conv(ae.encoder(x.to(run.device) * 2 - 1)).chunk(2, dim=1)[0]
        pool.add((mean * scale).cpu(), encode_text(clip, captions).to(torch.float16).cpu(), captions)

    for i in range(0, args.initial, 32):
        add_scenes(min(32, args.initial - i))
    print(f"[unet] latent scale factor {scale:.4f}, pool {len(pool)} scenes to start", flush=True)

    def ema_state_dict():
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
        sd = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        ema.restore(unet.parameters())
        return sd

    def save():
        models.save_weights(ema_state_dict(), run.out / models.UNET_FILE, fp16=True)

    while not run.done():
        add_scenes(args.fresh)
        z0, ctx = pool.sample(rng, args.batch)
        drop = torch.from_numpy(rng.random(args.batch) < args.cond_drop).to(run.device)
        ctx = torch.where(drop[:, None, None], empty.to(run.device)[None], ctx)
        noise = torch.randn_like(z0)
        t = torch.from_numpy(rng.integers(0, 1000, size=args.batch)).to(run.device)
        zt = noise_sched.add_noise(z0, noise, t)
        pred = unet(zt, timesteps=t.float(), context=ctx, transformer_options={})
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())
        run.log(loss.item(), pool=len(pool))
        if run.should_save():
            save()

    save()
    samples = sample_grid(models, world, run, scale, oc, ae, args)
    rec = run.record(models.UNET_FILE, scale_factor=scale, cond_drop=args.cond_drop, ema_decay=args.ema_decay,
                     scenes_seen=len(pool) + pool.next, vae_trained=have["vae"], clip_trained=have["clip"],
                     final_loss_definition="MSE of predicted vs true noise (eps), uniform timesteps",
                     schedule="SD1 discrete: scaled_linear 0.00085..0.012, 1000 steps", stored_dtype="float16 (EMA)",
                     **samples)
    print(f"[unet] done: {rec['steps']} steps in {rec['train_seconds'] / 60:.1f} min, final loss {rec['final_loss']:.5f}",
          flush=True)
    return rec


@torch.no_grad()
def sample_grid(models, world, run, scale, oc, ae, args) -> dict:
    """Sample the saved weights through ComfyUI's own sampler (euler, cfg 5) for held-out captions;
    save unet_samples.png and report how often the detector finds the prompted objects."""
    import comfy.sample
    detector = importlib.import_module("mc_shapes_world.detector")
    patcher = models.build_model_patcher(scale, models.load_weights(run.out / models.UNET_FILE))
    clip = models.build_comfy_clip(oc)
    n = 1 if args.tiny else args.sample_prompts
    scenes = [world.generate(world.HELD_OUT_SEED_START + 500 + i, n_objects=1 + i % 2) for i in range(n)]
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    images, hits = [], 0
    for i, sc in enumerate(scenes):
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(sc.caption))
        latent = torch.zeros(1, 4, 16, 16)
        noise = comfy.sample.prepare_noise(latent, 1000 + i)
        out = comfy.sample.sample(patcher, noise, args.sample_steps, 5.0, "euler", "normal", pos, neg, latent,
                                  denoise=1.0, seed=1000 + i)
        z = out.to(run.device) / scale
        img = ((ae.decoder(ae.post_quant_conv(z)).clamp(-1, 1) + 1) / 2).cpu()
        images.append(img)
        found = detector.detect((img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        hits += detector.prompt_satisfied(world.parse_caption(sc.caption), found)
    grid = torch.cat(images)
    common.save_image_grid(grid, run.out / "unet_samples.png")
    (run.out / "unet_samples.txt").write_text("\n".join(s.caption for s in scenes) + "\n")
    return {"samples": "unet_samples.png (captions in unet_samples.txt; euler, cfg 5, "
                       f"{args.sample_steps} steps)", "sample_prompt_success": hits / n, "sample_prompts": n}


if __name__ == "__main__":
    main()
