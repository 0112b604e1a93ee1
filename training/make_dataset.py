"""Pre-render a shapes-world scene set on every core, so GPU training is not starved by the
scene generator (4-5 ms a scene on one core).

Writes images.npy (N,128,128,3 uint8), captions.json, seeds.npy and tokens.npy: each caption's
token ids exactly as ComfyUI's SD1 tokenizer gives them (start 49406, words, end 49407, padded
with 49407 to 77), made here with open_clip's copy of the same CLIP BPE (checked against
ComfyUI's tokenizer in the tests).

    python -m training.make_dataset --n 200000 --workers 16 --out /dev/shm/shapes
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import pathlib
import sys
import time

import numpy as np

WORLD_FILE = pathlib.Path(__file__).resolve().parents[1] / "nodes" / "shapes_world" / "world.py"
CONTEXT = 77
START, END = 49406, 49407

_world = None
_tokenizer = None


def _load_world():
    spec = importlib.util.spec_from_file_location("mc_shapes_world_world", WORLD_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def comfy_sd1_tokens(captions: list[str], tokenizer=None) -> np.ndarray:
    """Token ids as ComfyUI's SD1Tokenizer gives them for short prompts (one 77-token chunk,
    padded with the end token)."""
    if tokenizer is None:
        from open_clip.tokenizer import SimpleTokenizer
        tokenizer = SimpleTokenizer(context_length=CONTEXT)
    out = np.full((len(captions), CONTEXT), END, dtype=np.int32)
    for i, text in enumerate(captions):
        ids = tokenizer.encode(text)[:CONTEXT - 2]
        out[i, 0] = START
        out[i, 1:1 + len(ids)] = ids
    return out


def _render(seeds):
    global _world, _tokenizer
    if _world is None:
        from open_clip.tokenizer import SimpleTokenizer
        _world, _tokenizer = _load_world(), SimpleTokenizer(context_length=CONTEXT)
    scenes = [_world.generate(int(s)) for s in seeds]
    captions = [s.caption for s in scenes]
    return np.stack([s.image for s in scenes]), captions, comfy_sd1_tokens(captions, _tokenizer)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200000)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed+n-1 (all below the held-out range)")
    p.add_argument("--workers", type=int, default=max(1, multiprocessing.cpu_count()))
    p.add_argument("--chunk", type=int, default=500)
    p.add_argument("--out", type=pathlib.Path, required=True)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = np.arange(args.first_seed, args.first_seed + args.n, dtype=np.int64)
    assert seeds[-1] < 10_000_000, "training seeds must stay below the held-out range"
    images = np.lib.format.open_memmap(args.out / "images.npy", mode="w+", dtype=np.uint8, shape=(args.n, 128, 128, 3))
    tokens = np.zeros((args.n, CONTEXT), dtype=np.int32)
    captions: list[str] = []
    chunks = [seeds[i:i + args.chunk] for i in range(0, args.n, args.chunk)]
    start, done = time.time(), 0
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(args.workers) as pool:
        for imgs, caps, toks in pool.imap(_render, chunks):
            images[done:done + len(caps)] = imgs
            tokens[done:done + len(caps)] = toks
            captions.extend(caps)
            done += len(caps)
            if done % (args.chunk * 40) == 0 or done == args.n:
                rate = done / (time.time() - start)
                print(f"[make_dataset] {done}/{args.n} scenes, {rate:.0f}/s", flush=True)
    images.flush()
    np.save(args.out / "tokens.npy", tokens)
    np.save(args.out / "seeds.npy", seeds)
    (args.out / "captions.json").write_text(json.dumps(captions))
    print(f"[make_dataset] done: {args.n} scenes in {time.time() - start:.0f} s -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
