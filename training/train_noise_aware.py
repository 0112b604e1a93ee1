"""Train the shapes-world noise-aware encoder for semantic diffusion guidance (SDG, paper 000, section
3.5): a time-conditioned copy of the dual encoder's image tower (FiLM on its BatchNorms, a latent
stem) learns to embed noised VAE latents as the frozen tower embeds the clean scenes. No captions.

    python -m training.train_noise_aware --minutes 20 --out models/shapes_world
    torchrun --standalone --nproc_per_node 4 -m training.train_noise_aware --batch 64 ...  # 4 GPUs: loss over 256

The algorithm (encoder, loss, optimiser) is nodes/algorithms/sdg.py, shared with the
MC_TrainNoiseAwareEncoder node. Scenes come from a pool re-rendered and re-encoded every
--pool-refresh steps (the VAE encode is the expensive part on a CPU); the noise is fresh every step.
Under torchrun each process renders its own scenes (its own seed) and the contrastive loss is over
the embeddings gathered from every process (the paper's batch of 256 = 4 GPUs x 64).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

import numpy as np
import torch

from . import comfy_env, common, distributed

WEIGHTS_FILE = "noise_aware.safetensors"


def load_sdg_algorithms():
    """nodes/algorithms/sdg.py (plain torch) under its own name: the pack's `nodes` package must never
    shadow ComfyUI's `nodes` module."""
    if "mc_sdg_algorithms" in sys.modules:
        return sys.modules["mc_sdg_algorithms"]
    spec = importlib.util.spec_from_file_location("mc_sdg_algorithms", comfy_env.PACK_DIR / "nodes" / "algorithms" / "sdg.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mc_sdg_algorithms"] = module
    spec.loader.exec_module(module)
    return module


def vision_config(visual) -> dict:
    """The open_clip config of a ModifiedResNet tower (what rebuilds it empty): read off the module."""
    width = visual.layer1[0].conv1.in_channels
    return {"embed_dim": int(visual.attnpool.c_proj.out_features),
            "vision_cfg": {"image_size": int(visual.image_size), "width": int(width),
                           "head_width": int(width * 32 // visual.attnpool.num_heads),
                           "layers": [len(visual.layer1), len(visual.layer2), len(visual.layer3), len(visual.layer4)]},
            "quick_gelu": False}


class LatentPool:
    """Scenes with their clean CLIP embeddings and model-space latents, refreshed in slices."""

    def __init__(self, world, mc_clip, vae, model, size: int, rng: np.random.Generator):
        self.world, self.mc_clip, self.vae, self.model, self.rng = world, mc_clip, vae, model, rng
        self.size = size
        self.clean, self.latents = None, None
        self.fill(0, size)

    @torch.no_grad()
    def encode(self, n: int):
        x, _ = common.world_batch(self.world, self.rng, n)
        images = x.permute(0, 2, 3, 1)
        clean = self.mc_clip.encode_image(images).float().cpu()
        latents = self.model.model.process_latent_in(self.vae.encode(images).float()).cpu()
        return clean, latents, (images * 255).round().to(torch.uint8)

    def fill(self, start: int, count: int):
        parts = [self.encode(min(64, count - i)) for i in range(0, count, 64)]
        clean, latents, images = (torch.cat([p[k] for p in parts]) for k in range(3))
        if self.clean is None:
            self.clean, self.latents, self.images = clean, latents, images
        else:
            self.clean[start:start + count], self.latents[start:start + count] = clean, latents
            self.images[start:start + count] = images

    def batch(self, n: int, generator: torch.Generator, with_images: bool = False):
        index = torch.randperm(self.size, generator=generator)[:n]
        if with_images:
            return self.clean[index], self.latents[index], self.images[index].float() / 255
        return self.clean[index], self.latents[index]


class GatheredEmbedding(torch.nn.Module):
    """The encoder as sdg.training_step calls it, under torchrun: DDP around the encoder (its
    gradients averaged), the embedding of every process's batch gathered (differentiable) so the
    contrastive loss sees the whole batch."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = distributed.wrap(encoder)

    def forward(self, latent_input, sigma):
        embedding, maps = self.encoder(latent_input, sigma)
        embedding = distributed.gather(embedding)
        # sdg.contrastive_loss's logits: every gathered embedding against every gathered clean one
        distributed.note_logits("noise_aware", (embedding.shape[0], embedding.shape[0]))
        return embedding, maps


class SyncedStem:
    """What sdg.stem_warmup_step reads of the encoder, with the latent stem in DDP (its gradients
    averaged across processes): the warm-up regresses the stem alone."""

    def __init__(self, encoder):
        self.encoder, self.stem = encoder, distributed.wrap(encoder.stem)

    def __getattr__(self, name):
        return getattr(self.encoder, name)


@torch.no_grad()
def evaluate(sdg, encoder, world, mc_clip, vae, model, sampling, n: int, device, seed: int = 0) -> dict:
    """On held-out scenes: cosine of the encoder (noised latents) with the clean CLIP, and top-1
    retrieval of the right clean scene among n, at several noise levels of the model's schedule."""
    encoder.eval()
    seeds = list(range(world.HELD_OUT_SEED_START, world.HELD_OUT_SEED_START + n))
    images, _ = world.batch(seeds)
    images = torch.from_numpy(images).float().div(255)
    clean = mc_clip.encode_image(images).float().to(device)
    latents = model.model.process_latent_in(vae.encode(images).float()).to(device)
    table = sampling.sigmas.float()
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for label, index in (("lowest", 0), ("t=250", 249), ("t=500", 499), ("t=750", 749), ("highest", table.numel() - 1)):
        sigma = table[index].to(device).expand(n)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        emb, _ = encoder(sampling.calculate_input(sigma, sampling.noise_scaling(sigma, noise, latents)), sigma)
        sims = emb @ clean.T
        out[label] = {"sigma": round(float(table[index]), 4), "cosine_with_clean_clip": round(float(sims.diag().mean()), 4),
                      "top1_among_n": round(float((sims.argmax(1) == torch.arange(n, device=device)).float().mean()), 4)}
    out["n"] = n
    return out


def main(argv=None):
    sdg = load_sdg_algorithms()
    p = common.base_parser(__doc__.splitlines()[0], steps=100000, batch=64, lr=1e-4)
    p.add_argument("--weight-decay", type=float, default=1e-3, help="AdamW weight decay (the paper's 1e-3)")
    p.add_argument("--pool", type=int, default=512, help="scenes encoded at a time")
    p.add_argument("--pool-refresh", type=int, default=200, help="re-render a sixteenth of the pool every this many steps")
    p.add_argument("--eval-scenes", type=int, default=128)
    p.add_argument("--stem-warmup", type=int, default=300,
                   help="steps of the latent stem's warm-up (regressing the pixel stem on clean latents) before the "
                        "fine-tune; 0 = none")
    p.add_argument("--stem-lr", type=float, default=1e-3)
    p.add_argument("--new-parts-lr-factor", type=float, default=10.0,
                   help="the latent stem and the FiLM MLP (not in CLIP) learn this many times faster")
    p.add_argument("--alignment-weight", type=float, default=sdg.ALIGNMENT_WEIGHT,
                   help="weight of the alignment term (1 - cosine with the clean embedding, ours) added to the paper's "
                        "contrastive loss; 0 = the paper's loss alone")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.batch, args.pool, args.eval_scenes, args.stem_warmup = min(args.steps, 3), 4, 8, 4, 2
    comfy_env.setup()
    world = importlib.import_module("mc_shapes_world.world")
    models = importlib.import_module("mc_shapes_world.models")

    run = common.Run("noise_aware", args)
    bundle = models.load_bundle("trained")
    mc_clip, vae, model = bundle["mc_clip"], bundle["vae"], bundle["model"]
    sampling = model.get_model_object("model_sampling")
    latent_format = model.model.latent_format
    record = sdg.EncoderRecord(vision_config=vision_config(mc_clip.model.visual),
                               latent_channels=int(latent_format.latent_channels),
                               latent_format=type(latent_format).__name__, scale_factor=float(latent_format.scale_factor),
                               trained_from=f"shapes_world dual encoder ({models.CLIP_FILE})")
    encoder = sdg.NoiseAwareEncoder(mc_clip.model.visual, record.latent_channels)
    if run.resume_from(WEIGHTS_FILE):
        old = sdg.read_encoder_record(run.out / WEIGHTS_FILE)
        if (old.latent_format, old.latent_channels) != (record.latent_format, record.latent_channels) or \
                abs(old.scale_factor - record.scale_factor) > 1e-6:
            raise SystemExit(f"--resume: {WEIGHTS_FILE} was trained for other latents ({old.latent_format}, scale "
                             f"{old.scale_factor}); the VAE changed: train afresh")
        encoder.load_state_dict(models.load_weights(run.out / WEIGHTS_FILE))
    encoder = encoder.to(run.device).requires_grad_(True)
    optimizer = sdg.make_optimizer(encoder, lr=args.lr, weight_decay=args.weight_decay,
                                   new_parts_lr_factor=args.new_parts_lr_factor)
    rng = np.random.default_rng(run.data_seed)
    generator = torch.Generator().manual_seed(run.data_seed)
    pool = LatentPool(world, mc_clip, vae, model, args.pool, rng)
    table = sampling.sigmas

    def save():
        run.save(lambda: sdg.save_encoder(encoder, record, run.out / WEIGHTS_FILE, fp16=True), run.out / WEIGHTS_FILE)

    resumed = bool(run.step_offset)
    if args.stem_warmup and not resumed:
        stem_optimizer = torch.optim.AdamW(encoder.stem.parameters(), lr=args.stem_lr, weight_decay=0.0)
        visual = mc_clip.model.visual
        warmed = SyncedStem(encoder) if run.dist.enabled else encoder
        for i in range(args.stem_warmup):
            _, latents, images = pool.batch(args.batch, generator, with_images=True)
            with torch.no_grad():
                target = sdg.pixel_stem_features(visual, mc_clip.preprocess(images))
            sigma0 = float(table[0])
            clean_input = sampling.calculate_input(torch.full((latents.shape[0],), sigma0), latents).to(run.device)
            stem_loss = sdg.stem_warmup_step(warmed, stem_optimizer, clean_input, target.to(run.device), sigma0)
            if i % 50 == 0 or i == args.stem_warmup - 1:
                run.print(f"[noise_aware] stem warm-up {i + 1}/{args.stem_warmup}: normalised MSE {stem_loss:.4f}")
        del warmed  # its DDP's gradient hooks go with it, before the fine-tune's
        run.extra["stem_warmup"] = {"steps": args.stem_warmup, "final_normalised_mse": round(stem_loss, 5), "lr": args.stem_lr}

    # --minutes budgets the fine-tune itself: encoding the pool and the warm-up come first (on a
    # busy CPU they took most of a 15-minute budget), and are recorded apart.
    import time

    run.extra["setup_seconds"] = round(run.elapsed(), 1)
    run.start = time.time()
    stepped = GatheredEmbedding(encoder) if run.dist.enabled else encoder
    while not run.done():
        clean, latents = pool.batch(args.batch, generator)
        distributed.note_batch(latents)
        sigmas = sdg.sample_sigmas(args.batch, table, float(sampling.sigma_min), float(sampling.sigma_max), generator)
        noise = torch.randn(latents.shape, generator=generator)
        latents, sigmas, noise = latents.to(run.device), sigmas.to(run.device), noise.to(run.device)
        noisy_input = sampling.calculate_input(sigmas, sampling.noise_scaling(sigmas, noise, latents))
        loss = sdg.training_step(stepped, optimizer, noisy_input, sigmas, distributed.gather(clean.to(run.device)),
                                  alignment_weight=args.alignment_weight)
        run.log(loss)
        if run.step % args.pool_refresh == 0:
            slice_size = max(1, args.pool // 16)
            start = int(rng.integers(0, max(args.pool - slice_size, 0) + 1))
            pool.fill(start, min(slice_size, args.pool - start))
        if run.should_save():
            save()

    run.end_training(encoder)
    save()
    if not run.is_main:
        run.finish()
        return None
    encoder.requires_grad_(False)
    metrics = evaluate(sdg, encoder, world, mc_clip, vae, model, sampling, args.eval_scenes, run.device, seed=args.seed)
    n = args.batch * run.dist.world_size
    rec = run.record(WEIGHTS_FILE, heldout=metrics, weight_decay=args.weight_decay,
                     alignment_weight=args.alignment_weight, pool=args.pool,
                     vae_record=models.read_record(models.WEIGHTS_DIR / models.VAE_FILE).get("finished_utc"),
                     encoder_record=sdg.encoder_metadata(record),
                     final_loss_definition=f"symmetric cross-entropy (both directions summed) over a batch of {n}"
                                           + (f" gathered from {run.dist.world_size} processes" if run.dist.enabled else "")
                                           + f", logit scale {sdg.LOGIT_SCALE:g} (chance = 2 ln {n} = {2 * np.log(n):.3f})"
                                           + (f", plus {args.alignment_weight:g} x mean(1 - cosine with the clean embedding)"
                                              if args.alignment_weight else ""),
                     stored_dtype="float16")
    print(f"[noise_aware] done: {rec['steps']} steps in {rec['train_seconds'] / 60:.1f} min, final loss {rec['final_loss']:.4f}; "
          + ", ".join(f"{k}: cos {v['cosine_with_clean_clip']:.3f} top-1 {v['top1_among_n']:.3f}" for k, v in metrics.items()
                      if isinstance(v, dict)), flush=True)
    run.finish()
    return rec


if __name__ == "__main__":
    main()
