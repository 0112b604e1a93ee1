"""Semantic diffusion guidance on the shapes world, the paper's protocol (issue 8): one function the
shapes-world report calls, and a command of its own.

    python benchmarks/sdg_report.py                     # docs/sdg_results.md (+ .json, pictures in docs/sdg/)
    python benchmarks/sdg_report.py --quick             # 4 samples, 4 steps: checks the code

From benchmarks/shapes_report.py:

    import sdg_report
    text, stats = sdg_report.sdg_measures(env, samples=100, steps=20)

All samples come from the shipped shapes-world UNet on the EMPTY prompt at cfg 1 (the model then
acts as the paper's unconditional model), guided by Apply Semantic Guidance in the mode named per
row. Measures, with the clean shapes-world dual encoder (the paper's "original CLIP"):
  * retrieval top-1/5/10: the guidance (text: its embedding; image: the reference's) ranks the
    sample among it and 99 random real scenes;
  * Fréchet distance between clean-CLIP features of samples and of real scenes (FID's formula);
  * diversity: mean pairwise cosine distance of the samples' features;
  * structure: layout match, the share of the reference's detected objects that a detection of
    the sample covers with box IoU >= 0.5 (the world's detector);
  * style: Gram distance (clean CLIP, every ResNet stage) of samples to the reference.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import time

import numpy as np

import harness
from measures import diversity, frechet_distance

DOCS = harness.ROOT / "docs"
REAL_SEED_START = 30_000  # the same real scenes as the shapes-world report's base-model retrieval

DEFAULT_START = 0.3  # the workflows' start_percent: the fine-tuned encoder reads the schedule from about t=500 down
DEFAULT_SWEEPS = {"text": [0, 20, 50, 100], "content": [0, 40, 100, 200], "structure": [0, 40, 200],
                  "style": [0, 10, 100, 1000], "text+content": [0, 40, 100]}  # around the workflows' scales


def retrieval_ranks(query: np.ndarray, sample_feats: np.ndarray, real_feats: np.ndarray, own: list[int], rng) -> np.ndarray:
    """Rank of each sample among itself and 99 random real scenes (not its own reference), by the
    similarity to its query (text or reference embedding)."""
    ranks = []
    for i in range(len(sample_feats)):
        others = rng.choice([j for j in range(len(real_feats)) if j != own[i]], size=99, replace=False)
        sims = np.concatenate([[sample_feats[i] @ query[i]], real_feats[others] @ query[i]])
        ranks.append(int((sims > sims[0]).sum()))
    return np.array(ranks)


class SDGBench:
    def __init__(self, env, steps: int, batch: int = 10):
        import torch

        self.env, self.steps, self.batch = env, steps, batch
        self.torch = torch
        loader = env.module("nodes.shapes_world_loader")
        self.sdg = env.module("nodes.sdg")
        self.glue = env.module("nodes.glue")
        self.clip_models = env.module("nodes.clip_models")
        self.world = env.module("nodes.shapes_world.world")
        self.detector = env.module("nodes.shapes_world.detector")
        bundle = loader.load("trained", 0)
        self.info = loader.describe(bundle)
        self.model, self.vae, self.mc_clip, clip = bundle["model"], bundle["vae"], bundle["mc_clip"], bundle["clip"]
        self.empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        self.encoder = None
        if self.sdg.SHAPES_WORLD_ENCODER_PATH.exists():
            (self.encoder,) = self.sdg.NoiseAwareEncoderLoader.execute(self.sdg.SHAPES_WORLD_ENCODER).result

    def features(self, images: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self.mc_clip.encode_image(self.torch.from_numpy(images).float() / 255).float().cpu().numpy()

    def grams(self, images: np.ndarray) -> list:
        algo = self.env.module("nodes.algorithms.sdg")
        with self.torch.no_grad():
            _, maps = self.clip_models.image_features(self.mc_clip, self.torch.from_numpy(images).float() / 255, [0, 1, 2, 3, 4])
        return [algo.gram(m) for m in maps]

    def sample(self, guidance_for, n: int, mode: str, seed0: int = 0, start_percent: float = 0.0) -> np.ndarray:
        """n images (uint8), in batches; guidance_for(indices) -> MC_GUIDANCE or None (unguided)."""
        torch = self.torch
        out = []
        for start in range(0, n, self.batch):
            idx = list(range(start, min(n, start + self.batch)))
            guidance = guidance_for(idx)
            model = self.model
            if guidance is not None:
                (model,) = self.sdg.ApplySemanticGuidance.execute(self.model, guidance, mode, start_percent, 1.0, 1, seed0 + start,
                                                                  vae=self.vae, noise_aware_encoder=self.encoder).result
            (latent,) = self.env.nodes.common_ksampler(model, seed0 + start, self.steps, 1.0, "euler", "normal", self.empty,
                                                       self.empty, {"samples": torch.zeros(len(idx), 4, 16, 16)})
            images = self.vae.decode(latent["samples"])
            out.append((images.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))
        return np.concatenate(out)


def layout_match(detector, reference: np.ndarray, sample: np.ndarray) -> float:
    truth = detector.detect(reference)
    if not truth:
        return float("nan")
    return len(detector.match(truth, detector.detect(sample))) / len(truth)


def sdg_measures(env, samples: int = 100, steps: int = 20, mode: str = "noise-aware", sweeps: dict | None = None,
                 batch: int = 10, pictures: pathlib.Path | None = None, start_percent: float = DEFAULT_START) -> tuple[str, dict]:
    """Every SDG table of issue 8 (markdown) and the numbers (dict). Call inside torch.inference_mode().
    Guidance acts from `start_percent` of the schedule to its end (the workflows' setting by default)."""
    import torch

    sweeps = sweeps or DEFAULT_SWEEPS
    bench = SDGBench(env, steps, batch)
    if mode == "noise-aware" and bench.encoder is None:
        mode = "decoded (fast)"
    world, sdg = bench.world, bench.sdg
    rng = np.random.default_rng(0)
    real_seeds = list(range(REAL_SEED_START, REAL_SEED_START + max(samples, 100)))
    scenes = [world.generate(s) for s in real_seeds]
    real_images = np.stack([s.image for s in scenes])
    captions = [s.caption for s in scenes]
    real_feats = bench.features(real_images)
    with torch.no_grad():
        text_feats = bench.mc_clip.encode_text(captions[:samples]).float().cpu().numpy()
    references = torch.from_numpy(real_images[:samples]).float() / 255
    own = list(range(samples))
    started = time.time()

    def text_g(idx, scale):
        return None if scale == 0 else _per_sample_text(bench, [captions[i] for i in idx], scale)

    def content_g(idx, scale, structure=False):
        return None if scale == 0 else sdg.ImageContentGuidance.execute(bench.mc_clip, references[idx], scale, structure, "auto").result[0]

    def style_g(idx, scale):
        return None if scale == 0 else sdg.ImageStyleGuidance.execute(bench.mc_clip, references[idx], scale, "auto").result[0]

    def both_g(idx, scale):
        if scale == 0:
            return None
        return sdg.CombineGuidance.execute(_per_sample_text(bench, [captions[i] for i in idx], scale), 0.5,
                                           content_g(idx, scale), 0.5).result[0]

    rows, stats = [], {"mode": mode, "samples": samples, "steps": steps, "sampler": "euler, cfg 1, empty prompt",
                       "start_percent": start_percent}
    unguided = None  # every kind's scale-0 row is the same seeds' unguided samples: sampled once
    kinds = [("text", text_g, "text"), ("content", content_g, "image"), ("structure", lambda i, s: content_g(i, s, True), "image"),
             ("style", style_g, "image"), ("text+content", both_g, "both")]
    picture_rows = []
    for kind, make, query in kinds:
        for scale in sweeps.get(kind, []):
            t0 = time.time()
            if scale == 0 and unguided is not None:
                images = unguided
            else:
                images = bench.sample(lambda idx: make(idx, scale), samples, mode, start_percent=start_percent)
                if scale == 0:
                    unguided = images
            seconds = time.time() - t0
            feats = bench.features(images)
            entry = {"kind": kind, "scale": scale, "seconds": round(seconds, 1),
                     "frechet": frechet_distance(feats, real_feats) if samples > 2 else float("nan"),
                     "diversity": diversity(feats)}
            for q, qfeats in (("text", text_feats), ("image", real_feats[:samples])):
                if query in (q, "both"):
                    ranks = retrieval_ranks(qfeats, feats, real_feats, own, rng)
                    entry[f"{q}_top1"], entry[f"{q}_top5"], entry[f"{q}_top10"] = ((ranks < k).mean() for k in (1, 5, 10))
            if kind == "structure" or (kind == "content" and scale == 0):
                entry["layout_match"] = float(np.nanmean([layout_match(bench.detector, real_images[i], images[i]) for i in range(samples)]))
            if kind == "style":
                ref_grams = bench.grams(real_images[:samples])
                gen_grams = bench.grams(images)
                entry["gram_distance"] = float(sum(((g - r) ** 2).flatten(1).sum(1) for g, r in zip(gen_grams, ref_grams)).mean())
            rows.append(entry)
            picture_rows.append((kind, scale, images[:6]))
            print(f"[sdg_report] {kind} scale {scale}: {json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in entry.items()})}",
                  flush=True)
    stats["rows"] = rows
    stats["seconds"] = round(time.time() - started, 1)
    picture = None
    if pictures is not None:
        picture = _save_pictures(pictures, picture_rows, real_images[:6])
    return _markdown(stats, picture, bench.info, bench.encoder), stats


def _per_sample_text(bench, texts: list[str], scale: float):
    """Text guidance with one caption per sample (the glue takes a (B, D) text embedding)."""
    torch = bench.torch
    with bench.glue.gradients_enabled(), torch.no_grad():
        embedding = bench.mc_clip.encode_text(texts).float().clone()
    return bench.glue.Guidance([bench.glue.GuidanceTerm("text", float(scale), bench.mc_clip, "sdg_report", text_embedding=embedding)])


def _save_pictures(folder: pathlib.Path, picture_rows, references: np.ndarray) -> str:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    h, w = references.shape[1:3]
    label = 150
    canvas = Image.new("RGB", (label + 6 * (w + 2), (len(picture_rows) + 1) * (h + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, h // 2), "real references\n(image rows)", fill="black")
    for c, img in enumerate(references):
        canvas.paste(Image.fromarray(img), (label + c * (w + 2), 0))
    for r, (kind, scale, images) in enumerate(picture_rows, 1):
        draw.text((4, r * (h + 2) + h // 2), f"{kind}\nscale {scale:g}", fill="black")
        for c, img in enumerate(images):
            canvas.paste(Image.fromarray(img), (label + c * (w + 2), r * (h + 2)))
    canvas.save(folder / "sdg_sweep.jpg", quality=85)  # a photo-like grid: JPEG keeps the repository small
    return "sdg_sweep.jpg"


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def _markdown(stats: dict, picture: str | None, info: str, encoder) -> str:
    lines = [f"""## Semantic diffusion guidance (issue 8)

Shapes world, {stats['samples']} samples per row, {stats['steps']} euler steps, cfg 1 on the **empty prompt**
(the UNet then acts as the paper's unconditional model), mode **{stats['mode']}** for every row
({encoder!r}), guidance from {stats['start_percent']:.0%} of the schedule to its end. Scale 0 is the unguided model. Retrieval ranks each sample among it and 99 random
real scenes by the clean dual encoder (chance: 1% / 5% / 10%); text rows use the caption's text
embedding as the query (the paper's text-to-image retrieval), image rows the reference's image
embedding. Fréchet distance on clean-encoder features against 100 real scenes (lower is closer to
the real distribution), diversity = mean pairwise cosine distance of sample features.

| guidance | scale | top-1 / top-5 / top-10 | Fréchet | diversity | other | s |
|---|---|---|---|---|---|---|"""]
    for r in stats["rows"]:
        tops = []
        for q in ("text", "image"):
            if f"{q}_top1" in r:
                tops.append(f"{q}: {_pct(r[f'{q}_top1'])} / {_pct(r[f'{q}_top5'])} / {_pct(r[f'{q}_top10'])}")
        other = []
        if "layout_match" in r:
            other.append(f"layout match {r['layout_match']:.1%}")
        if "gram_distance" in r:
            other.append(f"Gram distance {r['gram_distance']:.4g}")
        lines.append(f"| {r['kind']} | {r['scale']:g} | {'; '.join(tops)} | {r['frechet']:.3f} | {r['diversity']:.3f} | "
                     f"{', '.join(other)} | {r['seconds']:.0f} |")
    lines.append("""
The paper's marks (FFHQ/LSUN, pixel-space DDPM, RN50x16 CLIP): image guidance top-1 0.520 (ILVR
0.205), text guidance top-1 0.553, at an FID close to unguided and diversity kept. Structure rows
report the layout match against the reference's detected objects (unguided and global-content rows
give the chance level of that match); style rows the Gram distance to the reference (lower =
closer style), to be read against the scale-0 row.
""")
    if picture:
        lines.append(f"![sweep]({picture})\n")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mode", default="noise-aware", choices=["noise-aware", "decoded (fast)", "decoded (exact)"])
    parser.add_argument("--sweeps", help="JSON: {kind: [scales]} for kinds text, content, structure, style, text+content")
    parser.add_argument("--start-percent", type=float, default=DEFAULT_START,
                        help="guidance from this share of the schedule to its end (0 = every step)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(DOCS / "sdg_results.md"))
    args = parser.parse_args()
    sweeps = json.loads(args.sweeps) if args.sweeps else None
    if args.quick:
        args.samples, args.steps = 4, 4
        sweeps = sweeps or {k: v[:2] for k, v in DEFAULT_SWEEPS.items()}
    env = harness.comfy_env()
    out = pathlib.Path(args.out)
    text, stats = sdg_measures(env, args.samples, args.steps, args.mode, sweeps, pictures=out.parent / "sdg",
                               start_percent=args.start_percent)
    header = f"# Semantic diffusion guidance on the shapes world\n\nWritten by `python benchmarks/sdg_report.py " \
             f"{'--quick ' if args.quick else ''}--samples {args.samples} --steps {args.steps} --mode \"{args.mode}\" " \
             f"--start-percent {args.start_percent:g}` " \
             f"on {datetime.date.today()} in {stats['seconds']:.0f} s.\n\n"
    text = text.replace("](sdg_sweep.jpg)", "](sdg/sdg_sweep.jpg)")
    out.write_text(header + text)
    out.with_suffix(".json").write_text(json.dumps(stats, indent=2, default=float))
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    import torch

    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        main()
