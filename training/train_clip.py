"""Train the shapes-world dual encoder: open_clip.CLIP (ModifiedResNet image tower, 3-layer text
transformer, standard CLIP BPE, 77-token context) with the symmetric contrastive (InfoNCE) loss on
scene captions.

    python -m training.train_clip --minutes 25 --out models/shapes_world
    torchrun --standalone --nproc_per_node 4 -m training.train_clip --batch 64 --out ...  # 4 GPUs: InfoNCE over 256
"""
from __future__ import annotations

import importlib

import numpy as np
import torch

from . import comfy_env, common, distributed


@torch.no_grad()
def retrieval_accuracy(wrapper, world, seeds) -> dict:
    """Image->text and text->image top-1 accuracy among the given held-out scenes."""
    wrapper.model.eval()
    images, captions = world.batch(seeds)
    fi = wrapper.encode_image(torch.from_numpy(images).float().div(255))
    ft = wrapper.encode_text(captions)
    sim = fi @ ft.T
    target = torch.arange(len(seeds), device=sim.device)
    return {"image_to_text_top1": float((sim.argmax(1) == target).float().mean()),
            "text_to_image_top1": float((sim.argmax(0) == target).float().mean()),
            "n": len(seeds)}


def main(argv=None):
    p = common.base_parser(__doc__.splitlines()[0], steps=100000, batch=64, lr=5e-4)
    p.add_argument("--warmup", type=int, default=100)
    common.add_speed_arguments(p)
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.batch, args.warmup = min(args.steps, 3), 4, 1
    comfy_env.setup()
    world = importlib.import_module("mc_shapes_world.world")
    models = importlib.import_module("mc_shapes_world.models")
    import open_clip

    run = common.Run("clip", args)
    model = models.build_open_clip(seed=args.seed)
    if run.resume_from(models.CLIP_FILE):
        model.load_state_dict(models.load_weights(run.out / models.CLIP_FILE))
    model = model.to(run.device).train()
    trained = distributed.wrap(model)
    wrapper = models.ShapesWorldCLIP(model, device=run.device)
    decay = [p_ for n, p_ in model.named_parameters() if p_.ndim >= 2 and "embedding" not in n]
    no_decay = [p_ for n, p_ in model.named_parameters() if not (p_.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: common.lr_factor(run, args.warmup, args.lr_schedule))
    scenes = common.open_scene_set(args.dataset)
    loss_fn = distributed.clip_loss() if run.dist.enabled else open_clip.loss.ClipLoss()
    run.seed_data()
    rng = np.random.default_rng(run.data_seed)
    eval_seeds = list(range(world.HELD_OUT_SEED_START, world.HELD_OUT_SEED_START + (4 if args.tiny else 256)))

    def save():
        run.save(lambda: models.save_weights(model.state_dict(), run.out / models.CLIP_FILE, fp16=True),
                 run.out / models.CLIP_FILE)

    while not run.done():
        x, captions = common.scene_batches(world, rng, args.batch, scenes)
        pixels = wrapper.preprocess(x.permute(0, 2, 3, 1))
        tokens = wrapper.tokenize(captions).to(run.device)
        distributed.note_batch(pixels)
        with common.autocast(run.device, args.amp):
            fi, ft, logit_scale = trained(pixels, tokens)
        loss = loss_fn(fi.float(), ft.float(), logit_scale.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        run.log(loss.item(), logit_scale=logit_scale.item())
        if run.should_save():
            save()
            model.train()

    run.end_training(model)
    save()
    if not run.is_main:
        run.finish()
        return None
    acc = retrieval_accuracy(wrapper, world, eval_seeds)
    n = args.batch * run.dist.world_size
    rec = run.record(models.CLIP_FILE, heldout_retrieval=acc, warmup=args.warmup,
                     final_loss_definition=f"symmetric InfoNCE over a batch of {n} (chance = ln {n} = {np.log(n):.3f})"
                                           + (f", gathered from {run.dist.world_size} processes" if run.dist.enabled else ""),
                     stored_dtype="float16")
    print(f"[clip] done: {rec['steps']} steps in {rec['train_seconds'] / 60:.1f} min, final loss "
          f"{rec['final_loss']:.4f}, held-out top-1 among {acc['n']}: image->text {acc['image_to_text_top1']:.3f}, "
          f"text->image {acc['text_to_image_top1']:.3f}", flush=True)
    run.finish()
    return rec


if __name__ == "__main__":
    main()
