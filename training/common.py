"""Shared parts of the training commands: arguments, progress, loss curve (pillow), records.

Every command stops at `--steps` or after `--minutes` (whichever comes first), prints progress,
saves a checkpoint every `--save-every-minutes` (so an interrupted run still leaves weights),
draws the loss curve as a PNG and writes a JSON record (command, seed, time, final loss)
beside the weights.

Under torchrun (training/distributed.py) the Run is rank-aware: only rank 0 prints, saves
(`Run.save`) and writes the record; the --minutes budget is rank 0's clock, broadcast every step.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import random
import sys
import time

import numpy as np
import torch

from . import comfy_env, distributed

DEFAULT_OUT = comfy_env.PACK_DIR / "models" / "shapes_world"


def base_parser(description: str, steps: int, batch: int, lr: float) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="folder for weights, record and loss curve")
    p.add_argument("--steps", type=int, default=steps, help="optimiser steps (upper bound)")
    p.add_argument("--minutes", type=float, default=0.0, help="wall-clock budget; 0 = no limit")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every-minutes", type=float, default=5.0)
    p.add_argument("--tiny", action="store_true", help="a tiny setting for tests (few steps, small batches)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the weights and record already in --out (optimiser state starts afresh)")
    return p


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Run:
    """Progress, loss history, time budget and the record of one training run."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.name, self.args = name, args
        self.dist = distributed.init()
        self.is_main = self.dist.is_main
        self.out = pathlib.Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        if args.threads:
            torch.set_num_threads(args.threads)
        seed_everything(args.seed)
        self.device = comfy_env.device()
        self.start = time.time()
        self.losses: list[tuple[int, float]] = []
        self.extra: dict = {}
        self.last_save = time.time()
        self.step = 0
        self.step_offset, self.seconds_offset = 0, 0.0
        self.previous_runs: list[dict] = []
        self.previous_losses: list[tuple[int, float]] = []
        self._agreed = (-1, False, 0.0)  # (step, done, rank 0's elapsed seconds) as rank 0 decided
        processes = f", {self.dist.world_size} processes (batch {args.batch} each)" if self.dist.enabled else ""
        self.print(f"[{name}] device {self.device}, torch threads {torch.get_num_threads()}, "
                   f"steps <= {args.steps}, budget {args.minutes or 'none'} min, out {self.out}{processes}")

    def print(self, message: str):
        if self.is_main:
            print(message, flush=True)

    @property
    def data_seed(self) -> int:
        """This process's seed for data and noise (the run's seed on rank 0 and without torchrun)."""
        return distributed.data_seed(self.args.seed)

    def seed_data(self):
        """Reseed the global generators for this process's data and noise, after the models were
        built from the run's seed (under torchrun only: one process draws what it always drew)."""
        if self.dist.enabled:
            seed_everything(self.data_seed)

    def save(self, write, *paths):
        """Rank 0 writes (write() saves `paths`); the other processes write nothing."""
        if self.is_main:
            write()
            for path in paths:
                distributed.note_write(path)

    def end_training(self, *trained: torch.nn.Module):
        """After the last optimiser step (the MC_DIST_CHECK fingerprint of the trained modules)."""
        distributed.note_trained(*trained)

    def finish(self):
        """After the last save and record: every process waits for the others (see distributed.finish)."""
        distributed.finish(name=self.name, steps=self.step, batch_per_process=self.args.batch)

    def resume_from(self, weights_file: str) -> bool:
        """With --resume and weights in --out: carry over the earlier runs' record and loss history
        (the caller loads the weights). Returns whether there is something to resume."""
        stem = pathlib.Path(weights_file).stem
        if not (self.args.resume and (self.out / weights_file).exists()):
            return False
        rec_path = self.out / f"{stem}.json"
        prev = json.loads(rec_path.read_text()) if rec_path.exists() else {}
        history = prev.pop("loss_history", None)
        earlier = prev.pop("previous_runs", [])
        self.previous_runs = earlier + ([prev] if prev else [])
        self.step_offset = int(prev.get("total_steps", prev.get("steps", 0)))
        self.seconds_offset = float(prev.get("total_train_seconds", prev.get("train_seconds", 0.0)))
        self.previous_losses = [tuple(x) for x in history] if history else []
        if not history and (self.out / f"{stem}_loss.png").exists() and self.is_main:  # keep the earlier curve
            part = len(self.previous_runs)
            (self.out / f"{stem}_loss.png").rename(self.out / f"{stem}_loss_part{part}.png")
            if prev:
                prev["loss_curve"] = f"{stem}_loss_part{part}.png"
        self.print(f"[{self.name}] resuming after {self.step_offset} steps / {self.seconds_offset / 60:.1f} min")
        return True

    def elapsed(self) -> float:
        return time.time() - self.start

    def _over(self, seconds: float) -> bool:
        return self.step >= self.args.steps or (self.args.minutes > 0 and seconds >= self.args.minutes * 60)

    def done(self) -> bool:
        """Whether the run stops at this step. Under torchrun a collective call (rank 0's clock
        decides, every rank must call it once per step, as the training loop's condition)."""
        if not self.dist.enabled:
            return self._over(self.elapsed())
        if self._agreed[0] != self.step:
            stop, seconds = distributed.broadcast_from_main([float(self._over(self.elapsed())), self.elapsed()], self.device)
            self._agreed = (self.step, bool(stop), seconds)
        return self._agreed[1]

    def budget_elapsed(self) -> float:
        """Seconds elapsed as the budget counts them: rank 0's, as agreed at the last done()."""
        return self._agreed[2] if self.dist.enabled else self.elapsed()

    def log(self, loss: float, **more):
        """Every process calls it once per step: the loss is averaged over the processes (a
        contrastive loss over the gathered batch is the same on every rank)."""
        loss = distributed.mean(float(loss), self.device)
        self.step += 1
        self.losses.append((self.step, float(loss)))
        if not self.is_main:
            return
        if self.step == 1 or self.step % self.args.log_every == 0 or self._over(self.elapsed()):
            recent = [v for _, v in self.losses[-self.args.log_every:]]
            rate = self.step / max(self.elapsed(), 1e-6)
            left_steps = self.args.steps - self.step
            eta = left_steps / rate
            if self.args.minutes > 0:
                eta = min(eta, self.args.minutes * 60 - self.elapsed())
            extras = " ".join(f"{k} {v:.4g}" for k, v in more.items())
            print(f"[{self.name}] step {self.step}/{self.args.steps} loss {np.mean(recent):.5f} {extras} "
                  f"{rate:.2f} it/s elapsed {self.elapsed() / 60:.1f} min eta {max(eta, 0) / 60:.1f} min", flush=True)

    def should_save(self) -> bool:
        if time.time() - self.last_save >= self.args.save_every_minutes * 60:
            self.last_save = time.time()
            return True
        return False

    def final_loss(self, window: int = 50) -> float:
        vals = [v for _, v in self.losses[-window:]]
        return float(np.mean(vals)) if vals else float("nan")

    def record(self, weights_file: str, **fields) -> dict:
        """Write <weights>.json and <weights>_loss.png beside the weights (rank 0 only: call it there)."""
        assert self.is_main, "the record is rank 0's"
        stem = pathlib.Path(weights_file).stem
        rec = {
            "model": self.name,
            "weights": weights_file,
            "command": " ".join([os.path.basename(sys.executable), "-m", f"training.train_{self.name}"] + sys.argv[1:]),
            "seed": self.args.seed,
            "steps": self.step,
            "total_steps": self.step_offset + self.step,
            "batch": self.args.batch,
            "lr": self.args.lr,
            "train_seconds": round(self.elapsed(), 1),
            "total_train_seconds": round(self.seconds_offset + self.elapsed(), 1),
            "final_loss": self.final_loss(),
            "final_loss_window": min(50, len(self.losses)),
            "first_loss": self.losses[0][1] if self.losses else None,
            "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": str(self.device),
            "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus",
            "torch": torch.__version__,
            "loss_curve": f"{stem}_loss.png",
        }
        if self.dist.enabled:
            rec["processes"] = self.dist.world_size
            rec["global_batch"] = self.args.batch * self.dist.world_size
        if self.previous_runs:
            rec["previous_runs"] = self.previous_runs
        rec.update(self.extra)
        rec.update(fields)
        history = self.previous_losses + [(self.step_offset + s, v) for s, v in self.losses]
        every = max(1, len(history) // 4000)
        rec["loss_history"] = [[int(s), round(float(v), 6)] for s, v in history[::every]]
        (self.out / f"{stem}.json").write_text(json.dumps(rec, indent=2) + "\n")
        save_loss_curve(history, self.out / f"{stem}_loss.png", title=f"{self.name}: loss per step")
        distributed.note_write(self.out / f"{stem}.json")
        return rec


# ---------------------------------------------------------------------------------------------
# Loss curve with pillow only (matplotlib is not a dependency).

def save_loss_curve(losses: list[tuple[int, float]], path: pathlib.Path, title: str = "loss",
                    size: tuple[int, int] = (720, 420)):
    """Raw loss (light) and its moving average (dark) against step, log-scaled y axis."""
    from PIL import Image, ImageDraw

    W, H = size
    left, right, top, bottom = 70, 20, 36, 44
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((left, 10), title, fill="black")
    if not losses:
        img.save(path)
        return
    steps = np.array([s for s, _ in losses], dtype=np.float64)
    vals = np.array([max(v, 1e-12) for _, v in losses], dtype=np.float64)
    k = max(1, len(vals) // 50)
    smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
    smooth_steps = steps[k - 1:]
    ly = np.log10(vals)
    lo, hi = float(np.floor(ly.min() * 4) / 4), float(np.ceil(ly.max() * 4) / 4)
    if hi - lo < 0.25:
        hi = lo + 0.25
    x0, x1 = steps.min(), max(steps.max(), steps.min() + 1)

    def xy(s, v):
        x = left + (s - x0) / (x1 - x0) * (W - left - right)
        y = top + (hi - math.log10(max(v, 1e-12))) / (hi - lo) * (H - top - bottom)
        return x, y

    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for e in np.arange(math.ceil(lo * 4) / 4, hi + 1e-9, 0.25):
        _, y = xy(x0, 10 ** e)
        d.line([left, y, W - right, y], fill=(225, 225, 225))
        d.text((4, y - 6), f"{10 ** e:.3g}", fill="black")
    for i in range(6):
        s = x0 + (x1 - x0) * i / 5
        x, _ = xy(s, 10 ** lo)
        d.line([x, H - bottom, x, H - bottom + 4], fill="black")
        d.text((x - 12, H - bottom + 8), f"{int(s)}", fill="black")
    d.text((W // 2 - 15, H - 16), "step", fill="black")
    if len(steps) > 1:
        d.line([xy(s, v) for s, v in zip(steps, vals)], fill=(170, 190, 230), width=1)
        if len(smooth) > 1:
            d.line([xy(s, v) for s, v in zip(smooth_steps, smooth)], fill=(20, 40, 160), width=2)
    else:
        x, y = xy(steps[0], vals[0])
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(20, 40, 160))
    img.save(path)


# ---------------------------------------------------------------------------------------------
# Data

def world_batch(world, rng: np.random.Generator, n: int, low: int = 0, high: int | None = None):
    """n random training scenes: images as float BCHW in [0, 1] and captions."""
    high = high or world.HELD_OUT_SEED_START
    seeds = rng.integers(low, high, size=n)
    images, captions = world.batch(seeds)
    x = torch.from_numpy(images).float().div(255.0).permute(0, 3, 1, 2).contiguous()
    return x, captions


def save_image_grid(images_bchw_01: torch.Tensor, path: pathlib.Path, cols: int = 8):
    from PIL import Image
    x = (images_bchw_01.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    n, h, w, _ = x.shape
    rows = math.ceil(n / cols)
    grid = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = x[i]
    Image.fromarray(grid).save(path)


# ---------------------------------------------------------------------------------------------
# Speed: a pre-generated scene set (all cores), bf16 autocast, warmup + cosine learning rate.

def add_speed_arguments(p: argparse.ArgumentParser):
    p.add_argument("--dataset", type=pathlib.Path, default=None,
                   help="a scene set written by `python -m training.make_dataset` (default: fresh scenes per step)")
    p.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto",
                   help="bf16 autocast: auto = on CUDA only; bf16 = also on a CPU (a UNet step 1.9x faster on a "
                        "Zen 4 CPU with avx512_bf16, torch 2.13; 15x slower on a CPU without bf16 instructions: "
                        "check /proc/cpuinfo for avx512_bf16 or amx_bf16)")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="after warmup: constant, or cosine decay to 10%% over --steps (or --minutes)")


def autocast_enabled(device: torch.device, mode: str) -> bool:
    return mode == "bf16" or (mode == "auto" and device.type == "cuda")


def autocast(device: torch.device, mode: str):
    """bf16 autocast where asked (auto: CUDA only), else a no-op context."""
    import contextlib
    return torch.autocast(device.type, dtype=torch.bfloat16) if autocast_enabled(device, mode) else contextlib.nullcontext()


def lr_factor(run: "Run", warmup: int, schedule: str) -> float:
    """Linear warmup, then constant or cosine to 0.1 over the run's steps or minutes (whichever ends it)."""
    step = run.step
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(run.args.steps - warmup, 1)
    if run.args.minutes > 0:
        progress = max(progress, min(run.budget_elapsed() / (run.args.minutes * 60), 1.0))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class SceneSet:
    """Scenes pre-rendered by make_dataset: images (N,128,128,3) uint8 memory-mapped, captions,
    and the captions' token ids as ComfyUI's SD1 tokenizer gives them (N, 77)."""

    def __init__(self, folder: pathlib.Path):
        folder = self.folder = pathlib.Path(folder)
        self.images = np.load(folder / "images.npy", mmap_mode="r")
        self.tokens = np.load(folder / "tokens.npy")
        self.captions = json.loads((folder / "captions.json").read_text())
        self.seeds = np.load(folder / "seeds.npy")
        assert len(self.images) == len(self.captions) == len(self.tokens) == len(self.seeds)
        self.index = np.arange(len(self.captions))  # the scenes this process draws from

    def __len__(self):
        return len(self.captions)

    def split_across_processes(self, seed: int) -> "SceneSet":
        """Under torchrun: keep this rank's shard of a DistributedSampler (disjoint, shuffled by
        `seed`, the same on every rank); batches are drawn from it."""
        ctx = distributed.context()
        if ctx.enabled:
            from torch.utils.data import DistributedSampler
            sampler = DistributedSampler(self, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)
            self.index = np.asarray(list(sampler))
            distributed.note_shard(self.index)
        return self

    def encoded(self, encode, key: str | None, chunk: int = 512, log=print) -> torch.Tensor:
        """This process's scenes (sorted indices) encoded by `encode` (a BCHW [0, 1] batch -> latents),
        as float16 on the CPU. A single process with a `key` (what the latents depend on: the VAE's
        weights, its scale) keeps each chunk in `latents-<key>/` beside the set, so a run that was
        stopped, or the next one, continues where encoding stopped: on a CPU encoding 30k scenes
        takes longer than many training runs. Under torchrun every process encodes its own shard."""
        idx = np.sort(self.index)
        cache = None
        if key and not distributed.context().enabled:
            cache = self.folder / f"latents-{key}"
            cache.mkdir(exist_ok=True)
        chunks, encoded_now, started = [], 0, time.time()
        for n, start in enumerate(range(0, len(idx), chunk)):
            path = cache / f"{n:05d}-{chunk}.npy" if cache is not None else None
            if path is not None and path.exists():
                chunks.append(torch.from_numpy(np.load(path)))
                continue
            x = torch.from_numpy(np.ascontiguousarray(self.images[idx[start:start + chunk]])).float().div(255).permute(0, 3, 1, 2)
            latents = encode(x).float().to(torch.float16).cpu()
            if path is not None:  # written whole or not at all: an interrupted chunk is encoded again
                tmp = path.with_suffix(".tmp.npy")
                np.save(tmp, latents.numpy())
                os.replace(tmp, path)
            chunks.append(latents)
            encoded_now += len(latents)
            if (n + 1) % 10 == 0:
                log(f"[scenes] {start + len(latents)}/{len(idx)} encoded ({encoded_now / (time.time() - started):.1f} scenes/s)")
        if cache is not None:
            log(f"[scenes] {len(idx) - encoded_now} of {len(idx)} latents from {cache}, {encoded_now} encoded now")
        return torch.cat(chunks)

    def batch(self, rng: np.random.Generator, n: int):
        idx = np.sort(self.index[rng.integers(0, len(self.index), size=n)])
        x = torch.from_numpy(np.ascontiguousarray(self.images[idx])).float().div(255.0).permute(0, 3, 1, 2)
        return x.contiguous(), [self.captions[i] for i in idx], idx


def open_scene_set(folder) -> "SceneSet | None":
    """The pre-rendered scene set at `folder` (None: fresh scenes), this process's shard under torchrun."""
    return SceneSet(folder).split_across_processes(seed=0) if folder else None


def scene_batches(world, rng: np.random.Generator, n: int, scene_set: "SceneSet | None"):
    """(images BCHW [0,1], captions): from the pre-rendered set if there is one, else fresh scenes."""
    if scene_set is not None:
        x, captions, _ = scene_set.batch(rng, n)
        return x, captions
    return world_batch(world, rng, n)
