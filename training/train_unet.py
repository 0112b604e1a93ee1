"""Train the shapes-world text-to-image UNet: ComfyUI's own SD1-style UNetModel (small dims),
eps-prediction on the SD1 discrete schedule (scaled-linear betas 0.00085..0.012, 1000 steps;
diffusers' DDPMScheduler adds the noise), conditioned on the token embeddings the converted
ComfyUI text encoder gives (exactly CLIPTextEncode's output, frozen), with caption dropout to
the empty prompt's encoding so classifier-free guidance works, and an EMA of the weights
(diffusers' EMAModel). Latents are the trained VAE's posterior means times its scale factor.

With `--train-text-encoder` the text tower is trained jointly with the UNet by the same
denoising loss (GLIDE's recipe): the contrastive dual encoder's token embeddings need not
carry "red circle" against "blue square", the jointly trained ones must, or the loss stays
high. It starts from the dual encoder's text tower and is saved as text_encoder.safetensors
(open_clip text-tower keys), which the shapes-world loader then gives to CLIPTextEncode. The
vocabulary table (49408 x 128, 6.3M of the tower's 7M parameters) stays the dual encoder's and
out of that file: binding "red" to "circle" is the transformer's work, and the file is 1.2 MB
instead of 14.

`--dataset` trains on a scene set pre-rendered by `training.make_dataset`, encoded to latents
once (the GPU path); without it a pool of fresh scenes grows every step (the CPU path).
`--min-snr 5` weights each timestep's loss by min(SNR, 5) / SNR (Hang et al. 2023).

Two data options aim at what the v2 report found weak. `--object-count-weights 1:1.5,2:2` draws
scenes by how many objects they hold (here two-object scenes, whose relation binding is the
weakest number, about half of every batch instead of a third). `--colourless 0.1` gives that
share of captions with their colour words removed ("a circle to the left of a square"): the
generator's captions always name colours, so a model that never saw a colourless prompt
repaints a scribble's colour when a user's prompt says only "a circle".

Needs vae.safetensors and clip.safetensors in --models (falls back to random weights with a
warning, which is only useful for testing the command).

    python -m training.train_unet --minutes 90 --out models/shapes_world
    python -m training.train_unet --dataset /dev/shm/shapes --train-text-encoder --batch 256 \
        --lr-schedule cosine --min-snr 5 --minutes 8 --out models/shapes_world   # on a GPU
    torchrun --standalone --nproc_per_node 8 -m training.train_unet --dataset /dev/shm/shapes \
        --train-text-encoder --batch 64 ...   # 8 GPUs, global batch 512 (each encodes its shard)
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import re

import numpy as np
import torch

from . import comfy_env, common, distributed, make_dataset


# the text tower's tensors that never train and stay out of text_encoder.safetensors: the loader
# keeps the dual encoder's (clip.safetensors) for them
FROZEN_TEXT_KEYS = ("token_embedding.weight",)


def without_colours(caption: str, colours) -> str:
    """The caption with its colour words removed ("a small red circle" -> "a small circle")."""
    return re.sub(r"\b(?:" + "|".join(colours) + r")\s+", "", caption)


def parse_count_weights(text: str) -> dict[int, float]:
    """"1:1.5,2:2" -> {1: 1.5, 2: 2.0}; counts not named weigh 1."""
    weights = {}
    for part in filter(None, (t.strip() for t in text.split(","))):
        count, _, weight = part.partition(":")
        weights[int(count)] = float(weight)
        if weights[int(count)] < 0:
            raise ValueError(f"--object-count-weights: negative weight in {part!r}")
    return weights


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
        """(latents as float32, conditioning as stored: text embeddings or token ids) on the device."""
        idx = rng.integers(0, len(self.latents), size=n)
        return (torch.stack([self.latents[i] for i in idx]).to(self.device).float(),
                torch.stack([self.context[i] for i in idx]).to(self.device))


def encode_text(clip, captions: list[str]) -> torch.Tensor:
    """CLIPTextEncode's own path for each caption: (B, 77, width)."""
    return torch.cat([clip.encode_from_tokens_scheduled(clip.tokenize(t))[0][0] for t in captions]).float()


class TextTower(torch.nn.Module):
    """open_clip's text tower up to its final LayerNorm, trainable: token ids (B, 77) as ComfyUI's
    SD1 tokenizer gives them -> one embedding per token, equal to what the converted ComfyUI
    text encoder (CLIPTextEncode) gives for the same ids."""

    KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.")

    def __init__(self, open_clip_model):
        super().__init__()
        self.token_embedding = open_clip_model.token_embedding
        self.positional_embedding = open_clip_model.positional_embedding
        self.transformer = open_clip_model.transformer
        self.ln_final = open_clip_model.ln_final
        self.register_buffer("attn_mask", open_clip_model.attn_mask, persistent=False)

    def forward(self, tokens):
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.transformer(x, attn_mask=self.attn_mask)
        return self.ln_final(x)


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for eps-prediction: min(SNR, gamma) / SNR (1 where gamma <= 0)."""
    if gamma <= 0:
        return torch.ones_like(t, dtype=torch.float32)
    a = alphas_cumprod.to(t.device)[t].float()
    snr = a / (1 - a)
    return snr.clamp(max=gamma) / snr


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
    p.add_argument("--train-text-encoder", action="store_true",
                   help="train the text tower jointly (saved as text_encoder.safetensors)")
    p.add_argument("--text-lr-scale", type=float, default=0.5, help="text tower lr = lr * this")
    p.add_argument("--min-snr", type=float, default=0.0, help="min-SNR-gamma loss weighting (0 = uniform)")
    p.add_argument("--object-count-weights", type=str, default="",
                   help="with --dataset: draw scenes by object count, e.g. 1:1.5,2:2 (unnamed counts weigh 1)")
    p.add_argument("--colourless", type=float, default=0.0,
                   help="with --train-text-encoder: share of captions given without their colour words")
    common.add_speed_arguments(p)
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

    ae = models.build_autoencoder(seed=args.seed, ddconfig=models.vae_ddconfig_of(src / models.VAE_FILE))
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
    text_file = run.out / models.TEXT_ENCODER_FILE
    if args.train_text_encoder and args.resume and text_file.exists():
        oc.load_state_dict(models.load_weights(text_file), strict=False)
        run.print(f"[unet] text tower resumed from {text_file}")
    elif not args.train_text_encoder and (src / models.TEXT_ENCODER_FILE).exists():
        oc.load_state_dict(models.load_weights(src / models.TEXT_ENCODER_FILE), strict=False)
    clip = models.build_comfy_clip(oc)
    empty = encode_text(clip, [""])[0]
    text_tower = TextTower(oc).to(run.device).train(args.train_text_encoder).requires_grad_(args.train_text_encoder)
    text_tower.token_embedding.requires_grad_(False)  # the dual encoder's table (see the docstring)
    text_trained = [p for p in text_tower.parameters() if p.requires_grad]
    tokenize = make_dataset.comfy_sd1_tokens
    empty_tokens = torch.from_numpy(tokenize([""]).astype("int64")).to(run.device)

    base = models.build_base_model(scale, seed=args.seed + 2)
    if run.resume_from(models.UNET_FILE):  # continues from the saved (EMA) weights
        base.diffusion_model.load_state_dict(models.load_weights(run.out / models.UNET_FILE))
    unet = base.diffusion_model.to(run.device).train()
    denoiser = distributed.wrap(unet)
    text_encoder = distributed.wrap(text_tower) if args.train_text_encoder else text_tower
    trained = list(unet.parameters()) + text_trained
    # the EMA is what rank 0 saves; the other processes keep none
    ema = EMAModel(trained, decay=args.ema_decay, use_ema_warmup=True, power=3 / 4) if run.is_main else None
    groups = [{"params": list(unet.parameters()), "lr": args.lr, "weight_decay": 0.01}]
    if args.train_text_encoder:  # no decay: the tower starts from the trained dual encoder
        groups.append({"params": text_trained, "lr": args.lr * args.text_lr_scale, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: common.lr_factor(run, args.warmup, args.lr_schedule))
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                beta_schedule="scaled_linear", prediction_type="epsilon")
    # the schedule is ComfyUI's own SD1 schedule (checked here, and in the tests)
    comfy_sigmas = base.model_sampling.sigmas.float().cpu()
    ours = ((1 - noise_sched.alphas_cumprod) / noise_sched.alphas_cumprod).sqrt().float()
    assert torch.allclose(ours, comfy_sigmas, rtol=1e-4), "noise schedule differs from ComfyUI's"

    run.seed_data()
    rng = np.random.default_rng(run.data_seed)
    pool = LatentBuffer(args.pool, run.device)

    @torch.no_grad()
    def encode_latents(x):
        return ae.quant_conv(ae.encoder(x.to(run.device) * 2 - 1)).chunk(2, dim=1)[0] * scale

    @torch.no_grad()
    def add_scenes(n):
        x, captions = common.world_batch(world, rng, n)
        pool.add(encode_latents(x).cpu(), torch.from_numpy(tokenize(captions).astype("int64")) if args.train_text_encoder
                 else encode_text(clip, captions).to(torch.float16).cpu(), captions)

    if args.dataset:  # the whole pre-rendered set (this process's shard under torchrun), encoded once, kept on the device
        scenes = common.open_scene_set(args.dataset)
        shard = np.sort(scenes.index)

        def encode_chunk(x):
            with common.autocast(run.device, args.amp):
                return encode_latents(x)

        # cached beside the set, keyed by the VAE's weights (a random VAE is not cached)
        key = None
        if have["vae"]:
            vae_hash = hashlib.sha256((src / models.VAE_FILE).read_bytes()).hexdigest()[:12]
            key = f"vae{vae_hash}-{'bf16' if common.autocast_enabled(run.device, args.amp) else 'fp32'}"
        all_latents = scenes.encoded(encode_chunk, key, log=run.print).to(run.device)
        all_tokens = torch.from_numpy(scenes.tokens[shard].astype("int64")).to(run.device)
        shard_captions = [scenes.captions[i] for i in shard]
        if args.colourless > 0 and args.train_text_encoder:
            plain = tokenize([without_colours(c, world.COLOURS) for c in shard_captions])
            colourless_tokens = torch.from_numpy(plain.astype("int64")).to(run.device)
        draw_weights = None
        if args.object_count_weights:
            by_count = parse_count_weights(args.object_count_weights)
            counts = [len(world.parse_caption(c)) for c in shard_captions]
            draw_weights = torch.tensor([by_count.get(n, 1.0) for n in counts], dtype=torch.float64, device=run.device)
            shares = {n: float(draw_weights[torch.tensor(counts, device=run.device) == n].sum() / draw_weights.sum())
                      for n in sorted(set(counts))}
            run.print("[unet] draw share by object count: " + ", ".join(f"{n}: {s:.0%}" for n, s in shares.items()))
        run.print(f"[unet] {len(shard)} pre-rendered scenes encoded, latent std {all_latents.float().std():.3f}")
    else:
        for i in range(0, args.initial, 32):
            add_scenes(min(32, args.initial - i))
    run.print(f"[unet] latent scale factor {scale:.4f}, {len(pool) or len(all_latents)} scenes to start")

    def draw_batch():
        """(z0, context or token ids) for one step."""
        if args.dataset:
            if draw_weights is not None:
                idx = torch.multinomial(draw_weights, args.batch, replacement=True)
            else:
                idx = torch.randint(0, len(all_latents), (args.batch,), device=run.device)
            tokens = all_tokens[idx]
            if args.colourless > 0 and args.train_text_encoder:
                plain = torch.from_numpy(rng.random(args.batch) < args.colourless).to(run.device)
                tokens = torch.where(plain[:, None], colourless_tokens[idx], tokens)
            return all_latents[idx].float(), tokens
        add_scenes(args.fresh)
        return pool.sample(rng, args.batch)

    def ema_state_dicts():
        ema.store(trained)
        ema.copy_to(trained)
        unet_sd = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        text_sd = {k: v.detach().clone() for k, v in text_tower.state_dict().items() if k not in FROZEN_TEXT_KEYS}
        ema.restore(trained)
        return unet_sd, text_sd

    def write():
        unet_sd, text_sd = ema_state_dicts()
        models.save_weights(unet_sd, run.out / models.UNET_FILE, fp16=True)
        if args.train_text_encoder:
            models.save_weights(text_sd, run.out / models.TEXT_ENCODER_FILE, fp16=True)

    def save():
        run.save(write, run.out / models.UNET_FILE, *([run.out / models.TEXT_ENCODER_FILE] if args.train_text_encoder else []))

    while not run.done():
        z0, cond = draw_batch()
        distributed.note_batch(z0)
        drop = torch.from_numpy(rng.random(args.batch) < args.cond_drop).to(run.device)
        noise = torch.randn_like(z0)
        t = torch.randint(0, 1000, (args.batch,), device=run.device)
        zt = noise_sched.add_noise(z0, noise, t)
        with common.autocast(run.device, args.amp):
            if args.train_text_encoder:
                ctx = text_encoder(torch.where(drop[:, None], empty_tokens, cond))
            else:
                ctx = torch.where(drop[:, None, None], empty.to(run.device)[None], cond.float())
            pred = denoiser(zt, timesteps=t.float(), context=ctx, transformer_options={})
        per_sample = (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(noise_sched.alphas_cumprod, t, args.min_snr)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        lr_sched.step()
        if ema is not None:
            ema.step(trained)
        run.log(per_sample.mean().item(), weighted=loss.item(), lr=lr_sched.get_last_lr()[0])
        if run.should_save():
            save()

    run.end_training(unet, text_tower)
    save()
    if not run.is_main:
        run.finish()
        return None
    if args.train_text_encoder:  # sample with the text tower just trained (its EMA weights)
        oc.load_state_dict(models.load_weights(run.out / models.TEXT_ENCODER_FILE), strict=False)
    samples = sample_grid(models, world, run, scale, oc, ae, args) if args.sample_prompts > 0 else {}
    seen = run.step * args.batch * run.dist.world_size
    rec = run.record(models.UNET_FILE, scale_factor=scale, cond_drop=args.cond_drop, ema_decay=args.ema_decay,
                     scenes_seen=(len(pool) + pool.next if not args.dataset else len(all_latents)) * run.dist.world_size,
                     samples_seen=seen, vae_trained=have["vae"], clip_trained=have["clip"],
                     text_encoder=(models.TEXT_ENCODER_FILE + " (trained jointly)") if args.train_text_encoder
                     else "dual encoder's text tower (frozen)", min_snr_gamma=args.min_snr,
                     lr_schedule=args.lr_schedule, object_count_weights=args.object_count_weights or "uniform",
                     colourless_share=args.colourless, dataset=str(args.dataset) if args.dataset else "fresh scenes",
                     final_loss_definition="MSE of predicted vs true noise (eps), uniform timesteps (unweighted)",
                     schedule="SD1 discrete: scaled_linear 0.00085..0.012, 1000 steps", stored_dtype="float16 (EMA)",
                     **samples)
    print(f"[unet] done: {rec['steps']} steps in {rec['train_seconds'] / 60:.1f} min, final loss {rec['final_loss']:.5f}",
          flush=True)
    run.finish()
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
