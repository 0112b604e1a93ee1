"""Train the shapes-world VAE: ComfyUI's AutoencoderKL (SD latent layout, 128x128x3 -> 16x16x4).

Loss: L1 + MSE reconstruction of [-1, 1] images plus a small KL term on the diagonal Gaussian
posterior. The encoder is fully convolutional, so training on random crops (--crop) is the
same network at less cost. At the end the latent scale factor (1 / std of the posterior means
on fresh scenes) is computed and recorded, as SD's 0.18215 was.

    python -m training.train_vae --minutes 25 --out models/shapes_world
    torchrun --standalone --nproc_per_node 4 -m training.train_vae --dataset /dev/shm/shapes --out ...  # 4 GPUs
"""
from __future__ import annotations

import importlib

import numpy as np
import torch

from . import comfy_env, common, distributed


def posterior(model, x):
    """Mean and log-variance of AutoencoderKL's diagonal Gaussian (what its regulariser splits)."""
    moments = model.quant_conv(model.encoder(x))
    mean, logvar = torch.chunk(moments, 2, dim=1)
    return mean, torch.clamp(logvar, -30.0, 20.0)


def decode(model, z):
    return model.decoder(model.post_quant_conv(z))


class Reconstruction(torch.nn.Module):
    """The training forward in one module call (what DistributedDataParallel synchronises):
    posterior, a sample of it, its decoding."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        mean, logvar = posterior(self.model, x)
        z = mean + torch.exp(0.5 * logvar.float()) * torch.randn_like(mean.float())
        return mean, logvar, decode(self.model, z)


@torch.no_grad()
def evaluate(model, world, device, seeds) -> dict:
    """PSNR of full 128x128 reconstructions and the latent statistics on held-out scenes."""
    model.eval()
    images, _ = world.batch(seeds)
    x = torch.from_numpy(images).float().div(255).permute(0, 3, 1, 2).to(device) * 2 - 1
    mean, _ = posterior(model, x)
    rec = decode(model, mean).clamp(-1, 1)
    mse = ((rec - x) / 2).pow(2).mean(dim=(1, 2, 3))
    psnr = float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())
    model.train()
    return {"psnr": psnr, "latent_std": float(mean.std()), "latent_mean": float(mean.mean()),
            "recon": (rec + 1) / 2, "input": (x + 1) / 2}


def main(argv=None):
    p = common.base_parser(__doc__.splitlines()[0], steps=100000, batch=8, lr=2e-4)
    p.add_argument("--crop", type=int, default=64, help="random crop size for training (128 = whole images)")
    p.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the per-element mean KL")
    p.add_argument("--ch", type=int, default=None, help="base channel width (a multiple of 32; default: the "
                   "shipped architecture's, or the resumed weights')")
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--fp16", action="store_true", help="store the weights as float16 (half the file)")
    common.add_speed_arguments(p)
    args = p.parse_args(argv)
    if args.tiny:  # 3 steps unless --steps says otherwise
        args.steps = 3 if args.steps == p.get_default("steps") else args.steps
        args.batch, args.crop = 2, 32
    sw = comfy_env.setup()
    world = importlib.import_module("mc_shapes_world.world")
    models = importlib.import_module("mc_shapes_world.models")

    run = common.Run("vae", args)
    resuming = run.resume_from(models.VAE_FILE)
    ddconfig = models.vae_ddconfig_of(run.out / models.VAE_FILE) if resuming else dict(models.VAE_DDCONFIG)
    if args.ch and not resuming:
        ddconfig["ch"] = args.ch
    model = models.build_autoencoder(seed=args.seed, ddconfig=ddconfig)
    if resuming:
        model.load_state_dict(models.load_weights(run.out / models.VAE_FILE))
    model = model.to(run.device).train()
    reconstruction = distributed.wrap(Reconstruction(model))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: common.lr_factor(run, args.warmup, args.lr_schedule))
    scenes = common.open_scene_set(args.dataset)
    run.seed_data()
    rng = np.random.default_rng(run.data_seed)
    eval_seeds = list(range(world.HELD_OUT_SEED_START, world.HELD_OUT_SEED_START + (4 if args.tiny else 256)))

    def save():
        run.save(lambda: models.save_weights(model.state_dict(), run.out / models.VAE_FILE, fp16=args.fp16),
                 run.out / models.VAE_FILE)

    while not run.done():
        x, _ = common.scene_batches(world, rng, args.batch, scenes)
        if args.crop < 128:
            i, j = rng.integers(0, 128 - args.crop + 1, size=2)
            x = x[:, :, i:i + args.crop, j:j + args.crop]
        x = x.to(run.device, non_blocking=True) * 2 - 1
        distributed.note_batch(x)
        with common.autocast(run.device, args.amp):
            mean, logvar, rec = reconstruction(x)
        mean, logvar, rec = mean.float(), logvar.float(), rec.float()
        l1 = (rec - x).abs().mean()
        mse = (rec - x).pow(2).mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = l1 + mse + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        run.log((l1 + mse).item(), kl=kl.item())
        if run.should_save():
            save()

    run.end_training(model)
    save()
    if not run.is_main:
        run.finish()
        return None
    ev = evaluate(model, world, run.device, eval_seeds)
    scale = 1.0 / max(ev["latent_std"], 1e-6)
    common.save_image_grid(torch.cat([ev["input"][:8], ev["recon"][:8]]).cpu(), run.out / "vae_samples.png")
    rec = run.record(models.VAE_FILE, scale_factor=scale, heldout_psnr_db=ev["psnr"], latent_std=ev["latent_std"],
                     ddconfig=ddconfig, dataset=str(args.dataset) if args.dataset else "fresh scenes per step",
                     latent_mean=ev["latent_mean"], crop=args.crop, kl_weight=args.kl_weight,
                     final_loss_definition="L1 + MSE on [-1, 1] pixels (KL excluded)",
                     samples="vae_samples.png (top: held-out inputs, bottom: reconstructions)")
    print(f"[vae] done: {rec['steps']} steps in {rec['train_seconds'] / 60:.1f} min, final loss {rec['final_loss']:.5f}, "
          f"held-out PSNR {ev['psnr']:.2f} dB, scale factor {scale:.4f}", flush=True)
    run.finish()
    return rec


if __name__ == "__main__":
    main()
