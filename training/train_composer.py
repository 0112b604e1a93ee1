"""Train the shapes-world CDD-ICM composer (issue 10; arXiv 2304.02192 Sec. 2.6) in its three stages on
multi-turn shapes-world episodes, teacher-forced (each turn a (reference, instruction, target) triple):

  stage 1  L_icm (eq. 12)                         image/text encoders + fusion
  stage 2  L_cdd + delta * L_icm (eqs. 11, 12)    + the denoising UNet (delta = 0.1, gamma = 1.5)
  stage 3  L_n-icm                                the noisy-image encoder only (the rest frozen)

AdamW (lr 1e-4, weight decay 0.01); the CLIP backbones train at lr * eta (the backbone activity ratio,
0.001). The condition c is dropped to 0 with probability 0.2 (classifier-free guidance). Latents come
from the frozen shapes-world VAE; the composer starts from the shapes-world dual encoder and UNet
(nodes/shapes_world/composer.py says what was added and why).

The paper's validation schedule (every 10 epochs: keep or restore and halve the lr, stop after 5
restores) needs epochs over a fixed set; this command trains for --steps / --minutes on fresh episodes
instead, and says so in its record.

Ablations of the paper's Table 2: --no-icm (skip stage 1, delta = 0), --eta 0 --noisy-eta 0 (frozen
CLIP), --eta 1 (fully trainable), --stage-shares A,B,0 (no N-ICM, hence no ICM guidance). The noisy-image
encoder's backbone trains at the full lr by default (--noisy-eta 1): at lr * eta its N-ICM stayed at chance.

    python -m training.train_composer --minutes 10 --out models/shapes_world
    python -m training.train_composer --tiny --base random --out /tmp/composer   # CI
    torchrun --standalone --nproc_per_node 8 -m training.train_composer --out ...  # the paper's 8 GPUs

Under torchrun each stage's loss is the forward of a module around the composer (StageLoss) in
DistributedDataParallel, and L_icm / L_n-icm are over the (c, E(z)) pairs gathered from every process.
"""
from __future__ import annotations

import importlib
import logging

import numpy as np
import torch

from . import comfy_env, common, distributed


def stage_of(step: int, total: int, shares: tuple[float, float, float]) -> int:
    """1, 2 or 3: the stage a step belongs to when `total` steps are split by `shares` (skipping
    stages whose share is 0)."""
    bounds = np.cumsum(np.asarray(shares, np.float64) / max(sum(shares), 1e-12)) * total
    for stage, bound in enumerate(bounds, start=1):
        if step < bound:
            return stage
    return 3 if shares[2] > 0 else 2


def stage_parameter_groups(composer, stage: int, lr: float, eta: float, noisy_eta: float) -> list[dict]:
    """What trains in a stage, with its learning rate: the CLIP backbones at lr * eta (the paper's
    backbone activity ratio), except the noisy-image encoder's in stage 3 at lr * noisy_eta (it
    learns a new input, noised latents); heads at lr; the UNet in stage 2. Groups at lr 0 are left
    out (eta = 0: the backbone stays frozen)."""
    if stage == 3:
        groups = [{"params": composer.backbone_parameters(noisy=True), "lr": lr * noisy_eta},
                  {"params": composer.noisy_head_parameters(), "lr": lr}]
    else:
        groups = [{"params": composer.backbone_parameters(), "lr": lr * eta},
                  {"params": composer.head_parameters(), "lr": lr}]
        if stage == 2:
            groups.append({"params": list(composer.unet.parameters()), "lr": lr})
    return [g for g in groups if g["lr"] > 0]


class StageLoss(torch.nn.Module):
    """One step's loss of a stage as the forward of a module holding the composer: what
    DistributedDataParallel synchronises (the composer is called through several methods, never
    its own forward). Returns (loss, {part: value})."""

    def __init__(self, composer, algo, schedule, encode_latents, args):
        super().__init__()
        self.composer = composer
        self.algo, self.schedule, self.encode_latents, self.args = algo, schedule, encode_latents, args

    def icm(self, name: str, condition, embedding, tau):
        """Eq. 12 over the pairs of every process (each process's rows keep their gradient)."""
        condition, embedding = distributed.gather(condition), distributed.gather(embedding)
        distributed.note_logits(name, (condition.shape[0], embedding.shape[0]))
        return self.algo.icm_loss(condition, embedding, tau)

    def forward(self, stage: int, reference, target, tokens):
        composer, algo, schedule, args = self.composer, self.algo, self.schedule, self.args
        condition, context = composer.condition(reference, tokens)
        parts = {}
        if stage == 1:
            loss = self.icm("icm", condition, composer.target_embedding(target), composer.tau())
            parts["icm"] = loss.item()
        elif stage == 2:
            x0, ref_latent = self.encode_latents(target), self.encode_latents(reference)
            t = torch.randint(0, schedule.timesteps, (x0.shape[0],), device=x0.device)
            noise = torch.randn_like(x0)
            xt = schedule.q_sample(x0, t, noise)
            dropped = algo.drop_condition(condition, args.cond_drop)
            cdd = algo.hybrid_loss(schedule, x0, xt, t, noise, composer.denoise(xt, t, ref_latent, dropped, context),
                                   gamma=args.gamma)
            loss = cdd["loss"]
            parts.update(mse=cdd["mse"].item(), vlb=cdd["vlb"].item())
            if args.delta > 0:
                icm = self.icm("icm", condition, composer.target_embedding(target), composer.tau())
                loss = loss + args.delta * icm
                parts["icm"] = icm.item()
        else:
            x0 = self.encode_latents(target)
            t = torch.randint(0, schedule.timesteps, (x0.shape[0],), device=x0.device)
            xt = schedule.q_sample(x0, t, torch.randn_like(x0))
            loss = self.icm("nicm", condition.detach(), composer.noisy_embedding(xt), composer.noisy_tau())
            parts["nicm"] = loss.item()
        return loss, parts


def main(argv=None):
    p = common.base_parser(__doc__.splitlines()[0], steps=3000, batch=16, lr=1e-4)
    p.add_argument("--models", type=str, default=None, help="folder with the shapes-world vae/clip/unet (default: --out)")
    p.add_argument("--base", choices=["trained", "random"], default="trained",
                   help="start from the shipped shapes-world models, or seeded random ones (tests)")
    p.add_argument("--eta", type=float, default=1e-3, help="backbone activity ratio: CLIP backbone lr = lr * eta")
    p.add_argument("--noisy-eta", type=float, default=1.0,
                   help="the noisy-image encoder's backbone lr = lr * noisy_eta in stage 3. It must learn a new input "
                        "(noised latents through a 1x1 stem), which at lr * eta it barely does: the first shipped "
                        "composer's N-ICM loss stayed at chance (5.4 for 2 ln 16 = 5.5)")
    p.add_argument("--delta", type=float, default=0.1, help="weight of L_icm in stage 2")
    p.add_argument("--gamma", type=float, default=1.5, help="weight of L_vlb in L_cdd")
    p.add_argument("--cond-drop", type=float, default=0.2, help="probability of c -> 0 (classifier-free guidance)")
    p.add_argument("--no-icm", action="store_true", help="ablation: skip stage 1 and set delta = 0")
    p.add_argument("--stage-shares", type=str, default="0.15,0.7,0.15", help="shares of the steps of stages 1,2,3")
    p.add_argument("--turns", type=int, default=5, help="turns per episode")
    p.add_argument("--dim", type=int, default=128, help="d: width of the projections and the fused condition")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.batch, args.log_every, args.stage_shares = min(args.steps, 3), 2, 1, "1,1,1"  # a step per stage
    shares = tuple(float(x) for x in args.stage_shares.split(","))
    if args.no_icm:
        shares, args.delta = (0.0, shares[1], shares[2]), 0.0
    comfy_env.setup()
    models = importlib.import_module("mc_shapes_world.models")
    multiturn = importlib.import_module("mc_shapes_world.multiturn")
    world = importlib.import_module("mc_shapes_world.world")
    composer_mod = importlib.import_module("mc_shapes_world.composer")
    algo = composer_mod.cdd_icm()
    import open_clip

    run = common.Run("composer", args)
    src = common.pathlib.Path(args.models) if args.models else models.WEIGHTS_DIR
    have = models.weights_status(src) if args.base == "trained" else {"vae": False, "clip": False, "unet": False}
    for name, ok in have.items():
        if not ok:
            logging.warning("[composer] %s: UNTRAINED random weights (testing only)", name)
    ae = models.build_autoencoder(seed=args.seed, ddconfig=models.vae_ddconfig_of(src / models.VAE_FILE) if have["vae"] else None)
    scale = models.DEFAULT_SCALE_FACTOR
    if have["vae"]:
        ae.load_state_dict(models.load_weights(src / models.VAE_FILE))
        scale = float(models.read_record(src / models.VAE_FILE).get("scale_factor", scale))
        scale = float(models.read_record(src / models.UNET_FILE).get("scale_factor", scale))
    ae = ae.to(run.device).eval().requires_grad_(False)
    composer = composer_mod.build_composer(src, dim=args.dim, seed=args.seed, use_trained=args.base == "trained")
    if run.resume_from(composer_mod.COMPOSER_FILE):
        composer_mod.load_shipped_state(composer, models.load_weights(run.out / composer_mod.COMPOSER_FILE))
    composer = composer.to(run.device).train()
    schedule = algo.Schedule(algo.scaled_linear_betas(1000))
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=models.CLIP_TEXT_CFG["context_length"])
    run.seed_data()
    rng = np.random.default_rng(run.data_seed)

    @torch.no_grad()
    def encode_latents(images_bchw):
        return ae.quant_conv(ae.encoder(images_bchw.to(run.device) * 2 - 1)).chunk(2, dim=1)[0] * scale

    def batch():
        refs, targets, texts = [], [], []
        for _ in range(args.batch):
            ep = multiturn.generate_episode(int(rng.integers(0, world.HELD_OUT_SEED_START)), turns=args.turns)
            k = int(rng.integers(0, ep.turns))
            refs.append(ep.reference(k))
            targets.append(ep.images[k])
            texts.append(ep.instructions[k])
        to = lambda a: torch.from_numpy(np.stack(a)).float().div(255).permute(0, 3, 1, 2).to(run.device)  # noqa: E731
        return to(refs), to(targets), tokenizer(texts).to(run.device)

    def optimiser(stage: int):
        groups = stage_parameter_groups(composer, stage, args.lr, args.eta, args.noisy_eta)
        trained = {id(p) for g in groups for p in g["params"]}
        for param in composer.parameters():
            param.requires_grad_(id(param) in trained)
        return torch.optim.AdamW(groups, weight_decay=0.01) if groups else None

    def save():
        run.save(lambda: models.save_weights(composer_mod.shipped_state(composer), run.out / composer_mod.COMPOSER_FILE),
                 run.out / composer_mod.COMPOSER_FILE)

    stage_loss = StageLoss(composer, algo, schedule, encode_latents, args)
    stage, opt, step_loss, stage_losses = 0, None, None, {1: [], 2: [], 3: []}
    while not run.done():
        current = stage_of(run.step, args.steps, shares)
        if current != stage:
            step_loss = None  # the last stage's DDP (and its gradient hooks) go first
            stage, opt = current, optimiser(current)
            # DDP takes the parameters that train in this stage (requires_grad, set by optimiser());
            # some of them sit out a stage's loss (the patch projection in stage 1)
            step_loss = distributed.wrap(stage_loss, find_unused_parameters=True) if opt is not None else stage_loss
            run.print(f"[composer] stage {stage} from step {run.step}")
        reference, target, tokens = batch()
        distributed.note_batch(target)
        loss, parts = step_loss(stage, reference, target, tokens)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([q for g in opt.param_groups for q in g["params"]], 1.0)
            opt.step()
        stage_losses[stage].append(loss.item())
        run.log(loss.item(), stage=stage, **parts)
        if run.should_save():
            save()

    run.end_training(composer)
    save()
    if not run.is_main:
        run.finish()
        return None
    rec = run.record(composer_mod.COMPOSER_FILE, scale_factor=scale, dim=args.dim, eta=args.eta,
                     noisy_eta=args.noisy_eta, delta=args.delta, gamma=args.gamma, cond_drop=args.cond_drop, no_icm=args.no_icm, stage_shares=list(shares),
                     base=args.base, trained_from=have, turns=args.turns,
                     stage_final_loss={s: (float(np.mean(v[-20:])) if v else None) for s, v in stage_losses.items()},
                     schedule="SD1 scaled-linear (the shapes-world UNet's), 1000 steps",
                     validation="none: fixed steps on fresh episodes (the paper's restore-and-halve schedule needs epochs)")
    print(f"[composer] done: {run.step} steps in {run.elapsed() / 60:.1f} min; final loss {rec['final_loss']:.4f}; "
          f"weights {run.out / composer_mod.COMPOSER_FILE}", flush=True)
    run.finish()
    return rec


if __name__ == "__main__":
    main()
