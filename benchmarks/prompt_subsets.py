"""Representative, fair prompt subsets (segmentation-free guidance paper, Sec. 5.3, Fig. 10).

The paper compares two guidance methods on a few prompts only, chosen in two steps:
  1. *representative*: random subsets of the prompt set are drawn and the Fréchet distance between
     the CLIP text embeddings of a subset and of the whole set is measured; the curve of distance
     against subset size shows how small a subset still represents the set;
  2. *fair*: images of a subset of that size are made with classifier-free guidance and its prompts
     ranked by their CLIP score; the prompts at a high, a middle and a low percentile are kept, so
     the final prompts are neither all easy nor all hard for the model.

    python benchmarks/prompt_subsets.py                                   # shapes world, defaults below
    python benchmarks/prompt_subsets.py --prompts my_prompts.txt --clip open_clip:ViT-B-16:openai
    python benchmarks/prompt_subsets.py --prompts my_prompts.txt --clip file:/path/clip.safetensors:ViT-B-16
    python benchmarks/prompt_subsets.py --quick                           # seconds: checks the code

Prompts: a text file (one prompt a line; empty lines and lines starting with '#' are skipped) or
the shapes-world caption generator (`--shapes-world N`: the two-object captions of held-out scenes
10000.. as in benchmarks/shapes_report.py). CLIP (`--clip`), any MC_CLIP the pack loads:
`shapes_world` (the shipped dual encoder, nodes/shapes_world/models.py), `open_clip:ARCH:TAG`
(open_clip architecture + pretrained tag from the local cache, as MC_CLIPLoader), or
`file:PATH[:ARCH]` (a local weights file; a `<stem>.json` open_clip config beside it names a
custom architecture). Images for the CLIP-score ranking are made by ComfyUI's own KSampler from the
shapes-world MODEL/CLIP/VAE (the models that run here without downloads); `--no-images` stops after
step 1.

Writes (`--out-dir`, default docs/): NAME.png (distance against subset size, mean and spread over
the draws), NAME.md (settings, the curve's numbers, the chosen prompts with their scores),
NAME.json (every number), NAME.samples.png (one CFG image per chosen prompt); and the chosen
prompts, one a line, to `--prompts-out` (default benchmarks/data/segfree_prompts.txt).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import sys
import time

import numpy as np

BENCH = pathlib.Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

ROOT = BENCH.parent
DEFAULT_PROMPTS_OUT = BENCH / "data" / "segfree_prompts.txt"


# ---------------------------------------------------------------------------------------------
# Step 1: how small a subset still represents the set (no ComfyUI, no images)

def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID's formula on two feature sets; the one benchmarks/shapes_report.py uses."""
    from measures import frechet_distance as fd

    return fd(np.asarray(a, np.float64), np.asarray(b, np.float64))


def subset_distances(features: np.ndarray, sizes: list[int], draws: int, seed: int = 0) -> dict:
    """For each size: `draws` random subsets (without replacement) and their Fréchet distance to
    the whole set. Returns {size: {"distances": [...], "mean", "std", "best_subset": indices of the
    draw nearest the set}}."""
    rng = np.random.default_rng(seed)
    n = len(features)
    curve = {}
    for size in sizes:
        if not 2 <= size <= n:
            raise ValueError(f"subset size {size} is outside 2..{n} (the number of prompts)")
        subsets = [np.sort(rng.choice(n, size=size, replace=False)) for _ in range(draws)]
        distances = [frechet_distance(features[s], features) for s in subsets]
        best = int(np.argmin(distances))
        curve[size] = {"distances": distances, "mean": float(np.mean(distances)), "std": float(np.std(distances)),
                       "best_subset": subsets[best].tolist()}
    return curve


def choose_subset_size(curve: dict, fraction: float) -> int:
    """The smallest size whose mean distance is at most `fraction` of the smallest size's mean
    distance (the paper reads its size off the curve by eye; this is that reading made explicit)."""
    sizes = sorted(curve)
    limit = fraction * curve[sizes[0]]["mean"]
    for size in sizes:
        if curve[size]["mean"] <= limit:
            return size
    return sizes[-1]


# ---------------------------------------------------------------------------------------------
# Step 2: keep the prompts at high, middle and low percentiles of the CFG images' CLIP score

def percentile_picks(scores, percentiles: list[float], per_percentile: int = 1) -> list[tuple[float, int]]:
    """(percentile, index) pairs: for each percentile p, the `per_percentile` prompts whose rank in
    ascending score order is nearest to p/100 * (n - 1) (ties of distance: the higher rank first),
    each prompt picked once. In the order of `percentiles`."""
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    if per_percentile * len(percentiles) > n:
        raise ValueError(f"{per_percentile} x {len(percentiles)} picks from only {n} prompts")
    order = np.argsort(scores, kind="stable")  # rank -> prompt index
    taken: set[int] = set()
    picks = []
    for p in percentiles:
        if not 0 <= p <= 100:
            raise ValueError(f"percentile {p} is outside 0..100")
        target = p / 100.0 * (n - 1)
        ranks = sorted(range(n), key=lambda r: (abs(r - target), -r))
        chosen = [r for r in ranks if int(order[r]) not in taken][:per_percentile]
        for r in sorted(chosen, reverse=True):
            taken.add(int(order[r]))
            picks.append((p, int(order[r])))
    return picks


# ---------------------------------------------------------------------------------------------
# The plot (pillow: matplotlib is not a dependency)

def plot_curve(curve: dict, path: pathlib.Path, title: str, chosen: int | None = None, size=(760, 440)) -> None:
    """Mean distance (line and dots) and min..max over the draws (bars) against subset size, both
    axes logarithmic; the chosen size marked."""
    from PIL import Image, ImageDraw

    W, H = size
    left, right, top, bottom = 78, 24, 40, 52
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((left, 12), title, fill="black")
    sizes = sorted(curve)
    lows = [max(min(curve[s]["distances"]), 1e-9) for s in sizes]
    highs = [max(max(curve[s]["distances"]), 1e-9) for s in sizes]
    means = [max(curve[s]["mean"], 1e-9) for s in sizes]
    ylo, yhi = math.floor(math.log10(min(lows)) * 2) / 2, math.ceil(math.log10(max(highs)) * 2) / 2
    yhi = max(yhi, ylo + 0.5)
    xlo, xhi = math.log10(sizes[0]), math.log10(sizes[-1])
    xpad = max((xhi - xlo) * 0.05, 0.05)
    xlo, xhi = xlo - xpad, xhi + xpad

    def xy(s, v):
        return (left + (math.log10(s) - xlo) / (xhi - xlo) * (W - left - right),
                top + (yhi - math.log10(max(v, 1e-9))) / (yhi - ylo) * (H - top - bottom))

    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for e in np.arange(ylo, yhi + 1e-9, 0.5):
        _, y = xy(sizes[0], 10 ** e)
        d.line([left, y, W - right, y], fill=(225, 225, 225))
        d.text((6, y - 6), f"{10 ** e:.3g}", fill="black")
    for s in sizes:
        x, _ = xy(s, 10 ** ylo)
        d.line([x, H - bottom, x, H - bottom + 4], fill="black")
        d.text((x - 3 * len(str(s)), H - bottom + 8), str(s), fill="black")
    d.text((W // 2 - 40, H - 20), "subset size (prompts)", fill="black")
    d.text((6, top - 18), "Fréchet distance to the whole set", fill="black")
    if chosen in curve:
        x, _ = xy(chosen, 10 ** ylo)
        d.line([x, top, x, H - bottom], fill=(230, 140, 40), width=1)
        d.text((x + 4, top + 4), f"chosen: {chosen}", fill=(200, 100, 20))
    for s, lo, hi in zip(sizes, lows, highs):
        (x, y0), (_, y1) = xy(s, lo), xy(s, hi)
        d.line([x, y0, x, y1], fill=(160, 180, 225), width=3)
    points = [xy(s, m) for s, m in zip(sizes, means)]
    if len(points) > 1:
        d.line(points, fill=(20, 40, 160), width=2)
    for x, y in points:
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(20, 40, 160))
    img.save(path)


# ---------------------------------------------------------------------------------------------
# ComfyUI side: the CLIP, the prompts' embeddings, CFG images and their CLIP scores

def read_prompts(path: pathlib.Path) -> list[str]:
    lines = [line.strip() for line in pathlib.Path(path).read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def shapes_world_prompts(env, count: int, first_seed: int = 10_000) -> list[str]:
    world = env.module("nodes.shapes_world.world")
    return [world.generate(first_seed + i, n_objects=2).caption for i in range(count)]


def load_mc_clip(env, spec: str, weights: str):
    """An MC_CLIP from `shapes_world`, `open_clip:ARCH:TAG` or `file:PATH[:ARCH]`."""
    import comfy.model_management
    import torch

    if spec == "shapes_world":
        return env.module("nodes.shapes_world_loader").load(weights, 0)["mc_clip"]
    clip_models = env.module("nodes.clip_models")
    device = comfy.model_management.get_torch_device()
    kind, _, rest = spec.partition(":")
    with torch.inference_mode(False):
        if kind == "open_clip" and ":" in rest:
            architecture, tag = rest.split(":", 1)
            return clip_models.load_open_clip(architecture, tag, None, device)
        if kind == "file" and rest:
            path, architecture = (rest, "") if pathlib.Path(rest).exists() else rest.rsplit(":", 1) if ":" in rest else (rest, "")
            if not pathlib.Path(path).is_file():
                raise SystemExit(f"--clip {spec}: no file {path}")
            return clip_models.load_open_clip(architecture or "ViT-B-16", None, path, device)
    raise SystemExit(f"--clip {spec!r}: expected shapes_world, open_clip:ARCH:TAG or file:PATH[:ARCH]")


def text_features(mc_clip, prompts: list[str], batch: int = 256) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([mc_clip.encode_text(prompts[i:i + batch]).float().cpu().numpy()
                               for i in range(0, len(prompts), batch)])


class CFGSampler:
    """Classifier-free guidance images from the shapes-world models with ComfyUI's own KSampler."""

    def __init__(self, env, weights: str, steps: int, cfg: float, sampler: str, scheduler: str, seeds: int):
        self.env = env
        bundle = env.module("nodes.shapes_world_loader").load(weights, 0)
        self.model, self.clip, self.vae = bundle["model"], bundle["clip"], bundle["vae"]
        self.info = env.module("nodes.shapes_world_loader").describe(bundle)
        self.image_size = env.module("nodes.shapes_world.models").IMAGE_SIZE
        self.steps, self.cfg, self.sampler, self.scheduler, self.seeds = steps, cfg, sampler, scheduler, seeds
        self.negative = self.encode("")

    def encode(self, text: str):
        return self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))

    def images(self, prompts: list[str], seed: int) -> np.ndarray:
        """uint8 (len(prompts) * seeds, H, W, 3), prompt-major: one KSampler batch holding `seeds`
        images of each prompt (their conditionings stacked along the batch; ComfyUI draws each
        image its own noise from `seed`). One batch amortises the per-step overhead of the tiny UNet."""
        import torch

        conds = [self.encode(p)[0] for p in prompts for _ in range(self.seeds)]
        extra = {k: torch.cat([c[1][k] for c in conds]) for k in conds[0][1] if torch.is_tensor(conds[0][1][k])}
        positive = [[torch.cat([c[0] for c in conds]), {**conds[0][1], **extra}]]
        side = self.image_size // self.vae.downscale_ratio
        channels = self.model.model.latent_format.latent_channels
        latent = torch.zeros(len(conds), channels, side, side)
        (out,) = self.env.nodes.common_ksampler(self.model, seed, self.steps, self.cfg, self.sampler, self.scheduler,
                                                positive, self.negative, {"samples": latent})
        decoded = self.vae.decode(out["samples"])
        return (decoded.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)


def clip_scores(mc_clip, images: np.ndarray, prompt: str) -> np.ndarray:
    """CLIP score of each image for its prompt: 100 x cosine of the image and text embeddings."""
    import torch

    with torch.no_grad():
        image = mc_clip.encode_image(torch.from_numpy(images).float() / 255.0).float()
        text = mc_clip.encode_text([prompt]).float()
    return (100.0 * image @ text.T)[:, 0].cpu().numpy()


# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prompts", type=pathlib.Path, help="prompt list file (one a line; '#' lines skipped)")
    src.add_argument("--shapes-world", type=int, default=1000, metavar="N",
                     help="use N shapes-world two-object captions (default 1000)")
    ap.add_argument("--clip", default="shapes_world",
                    help="shapes_world | open_clip:ARCH:TAG | file:PATH[:ARCH] (default shapes_world)")
    ap.add_argument("--weights", default="trained", choices=["trained", "random (untrained)"],
                    help="shapes-world weights for the CFG images (and for --clip shapes_world)")
    ap.add_argument("--sizes", default="10,20,50,100,200,500", help="subset sizes for the distance curve")
    ap.add_argument("--draws", type=int, default=20, help="random subsets per size")
    ap.add_argument("--subset-size", default="auto",
                    help="size of the subset whose prompts are ranked; 'auto': the smallest size whose mean distance "
                         "is at most --fraction of the smallest size's")
    ap.add_argument("--fraction", type=float, default=0.2, help="for --subset-size auto (default 0.2)")
    ap.add_argument("--percentiles", default="90,50,10", help="CLIP-score percentiles to keep (high, middle, low)")
    ap.add_argument("--per-percentile", type=int, default=8,
                    help="prompts kept around each percentile (default 8: 24 prompts, as many as shapes_report.py compares)")
    ap.add_argument("--no-images", action="store_true", help="only the distance curve (step 1)")
    ap.add_argument("--seeds", type=int, default=2, help="CFG images per prompt (their CLIP scores are averaged)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--batch", type=int, default=16, help="prompts sampled together in one KSampler batch")
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--scheduler", default="normal")
    ap.add_argument("--seed", type=int, default=0, help="seed of the subset draws and of the images")
    ap.add_argument("--out-dir", type=pathlib.Path, default=ROOT / "docs")
    ap.add_argument("--name", default="prompt_subsets", help="file name stem of the report files")
    ap.add_argument("--prompts-out", type=pathlib.Path, default=DEFAULT_PROMPTS_OUT)
    ap.add_argument("--quick", action="store_true",
                    help="60 prompts, sizes 5,10,20, 3 draws, 1 seed, 3 steps, 1 prompt per percentile")
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes_world = 60 if args.prompts is None else args.shapes_world
        args.sizes, args.draws, args.seeds, args.steps, args.per_percentile = "5,10,20", 3, 1, 3, 1
    return args


def main(argv=None) -> dict:
    import harness

    args = parse_args(argv)
    started = time.time()
    env = harness.comfy_env()
    prompts = read_prompts(args.prompts) if args.prompts else shapes_world_prompts(env, args.shapes_world)
    source = str(args.prompts) if args.prompts else f"shapes-world two-object captions (scenes 10000..{10_000 + len(prompts) - 1})"
    if len(prompts) < 3:
        raise SystemExit(f"need at least 3 prompts, got {len(prompts)}")
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    sizes = [s for s in sizes if s < len(prompts)] or [max(2, len(prompts) // 2)]
    percentiles = [float(p) for p in args.percentiles.split(",")]
    mc_clip = load_mc_clip(env, args.clip, args.weights)
    features = text_features(mc_clip, prompts)
    print(f"{len(prompts)} prompts ({source}), CLIP {args.clip} ({features.shape[1]}-d text embeddings)", flush=True)

    curve = subset_distances(features, sizes, args.draws, args.seed)
    for size in sizes:
        print(f"  subset {size:5d}: Fréchet distance {curve[size]['mean']:.4f} ± {curve[size]['std']:.4f} "
              f"(min {min(curve[size]['distances']):.4f}, max {max(curve[size]['distances']):.4f}, {args.draws} draws)")
    subset_size = choose_subset_size(curve, args.fraction) if args.subset_size == "auto" else int(args.subset_size)
    if subset_size not in curve:  # a size not on the curve: draw it the same way
        curve.update(subset_distances(features, [subset_size], args.draws, args.seed + 1))
    subset = curve[subset_size]["best_subset"]
    print(f"subset size {subset_size} (distance {curve[subset_size]['mean']:.4f}); its most representative draw: "
          f"{min(curve[subset_size]['distances']):.4f}", flush=True)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / args.name
    plot_curve({s: curve[s] for s in sorted(curve)}, stem.with_suffix(".png"),
               f"Fréchet distance of random prompt subsets to all {len(prompts)} prompts (CLIP {args.clip}, "
               f"{args.draws} draws per size)", chosen=subset_size)
    result = {"command": "python benchmarks/prompt_subsets.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": str(datetime.date.today()), "prompts": len(prompts), "source": source, "clip": args.clip,
              "embedding_dim": int(features.shape[1]), "draws": args.draws,
              "curve": {str(s): {k: v for k, v in curve[s].items() if k != "best_subset"} for s in sorted(curve)},
              "subset_size": subset_size, "subset": [prompts[i] for i in subset]}

    chosen_rows = []
    if not args.no_images:
        sampler = CFGSampler(env, args.weights, args.steps, args.cfg, args.sampler, args.scheduler, args.seeds)
        scores, first_images = [], []
        t0 = time.time()
        for start in range(0, len(subset), args.batch):
            chunk = [prompts[i] for i in subset[start:start + args.batch]]
            images = sampler.images(chunk, args.seed + start)
            for k, prompt in enumerate(chunk):
                mine = images[k * args.seeds:(k + 1) * args.seeds]
                scores.append(float(clip_scores(mc_clip, mine, prompt).mean()))
                first_images.append(mine[0])
            done = len(scores)
            print(f"  CFG images of {done}/{len(subset)} prompts "
                  f"(ETA {(time.time() - t0) / done * (len(subset) - done):.0f} s)", flush=True)
        picks = percentile_picks(scores, percentiles, args.per_percentile)
        ranks = {int(j): r for r, j in enumerate(np.argsort(scores, kind="stable"))}
        chosen_rows = [{"percentile": p, "prompt": prompts[subset[j]], "clip_score": scores[j],
                        "rank": ranks[j] + 1} for p, j in picks]
        result.update({"models": sampler.info, "sampling": {"steps": args.steps, "cfg": args.cfg, "sampler": args.sampler,
                                                            "scheduler": args.scheduler, "seeds": args.seeds},
                       "subset_scores": scores, "percentiles": percentiles, "chosen": chosen_rows})
        from PIL import Image

        from shapes_report import grid
        strip = grid(np.stack([first_images[j] for _, j in picks]), columns=args.per_percentile)
        Image.fromarray(strip).save(stem.with_suffix(".samples.png"))
        args.prompts_out.parent.mkdir(parents=True, exist_ok=True)
        args.prompts_out.write_text(
            f"# Prompts for the segmentation-free vs classifier-free comparison, chosen by\n# {result['command']}\n"
            f"# (segmentation-free guidance paper, Sec. 5.3): a {subset_size}-prompt subset representative of "
            f"{len(prompts)} prompts,\n# ranked by the CLIP score of CFG images; kept: percentiles "
            f"{', '.join(f'{p:g}' for p in percentiles)} ({args.per_percentile} each).\n"
            "# One prompt a line; lines starting with '#' are comments.\n"
            + "".join(f"{row['prompt']}\n" for row in chosen_rows))
        for row in chosen_rows:
            print(f"  p{row['percentile']:g}: {row['prompt']!r} (CLIP score {row['clip_score']:.2f}, "
                  f"rank {row['rank']}/{len(subset)})")
        print(f"wrote {args.prompts_out}")

    result["seconds"] = round(time.time() - started, 1)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(report_markdown(result, stem, args))
    print(f"wrote {stem.with_suffix('.md')}, {stem.with_suffix('.png')}, {stem.with_suffix('.json')} "
          f"({result['seconds']:.0f} s)")
    return result


def report_markdown(result: dict, stem: pathlib.Path, args) -> str:
    rows = "\n".join(f"| {s} | {c['mean']:.4f} | {c['std']:.4f} | {min(c['distances']):.4f} | {max(c['distances']):.4f} |"
                     for s, c in result["curve"].items())
    text = f"""# Representative prompt subsets

Written by `{result['command']}` on {result['date']} in {result['seconds']:.0f} s.
The segmentation-free guidance paper's method for choosing comparison prompts (Sec. 5.3, Fig. 10;
`benchmarks/prompt_subsets.py`): how small a random subset still represents the prompt set (Fréchet
distance between the CLIP text embeddings of the subset and of the whole set), then the prompts of
such a subset at high, middle and low percentiles of the CLIP score of their classifier-free
guidance images.

Prompts: {result['prompts']} ({result['source']}); CLIP: `{result['clip']}` ({result['embedding_dim']}-d text
embeddings); {result['draws']} random draws per subset size.

![Fréchet distance against subset size]({stem.name}.png)

| subset size | mean distance | std | min | max |
|---|---|---|---|---|
{rows}

Subset used for the ranking: **{result['subset_size']} prompts** (`--subset-size {args.subset_size}`, fraction
{args.fraction}), the draw of that size nearest the whole set.
"""
    if result.get("chosen"):
        s = result["sampling"]
        scores = np.array(result["subset_scores"])
        chosen = "\n".join(f"| {r['percentile']:g} | {r['rank']}/{result['subset_size']} | {r['clip_score']:.2f} | {r['prompt']} |"
                           for r in result["chosen"])
        text += f"""
## Chosen prompts

CFG images: ComfyUI's KSampler, {s['sampler']}/{s['scheduler']}, {s['steps']} steps, cfg {s['cfg']}, {s['seeds']}
image(s) per prompt ({result['models']}). CLIP score = 100 x cosine of image and prompt embeddings
(same CLIP), averaged over a prompt's images. Over the subset: mean {scores.mean():.2f}, min {scores.min():.2f},
median {np.median(scores):.2f}, max {scores.max():.2f}.

| percentile | rank (ascending) | CLIP score | prompt |
|---|---|---|---|
{chosen}

![one CFG image per chosen prompt, rows = percentiles]({stem.name}.samples.png)

The list is in `{args.prompts_out.relative_to(ROOT) if args.prompts_out.is_relative_to(ROOT) else args.prompts_out}`
(one prompt a line, `#` comments).
"""
    return text


if __name__ == "__main__":
    import torch

    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        main()
