"""Evaluate the shapes-world CDD-ICM composer as GeNeVA evaluates i-CLEVR models (issue 10): on held-out
multi-turn episodes, generate every turn iteratively (each output the next reference) or teacher-forced
(each turn from the ground-truth reference), run the shapes-world detector on generated and ground-truth
images alike, and report precision / recall / F1 per turn, F1 over all turns, and RSIM on the last
turn, beside the paper's i-CLEVR marks. Also seconds per turn on this machine.

    python benchmarks/eval_composer.py --episodes 50 --steps 25            # the shipped (or untrained) composer
    python benchmarks/eval_composer.py --quick --weights untrained         # CI: 2 episodes, 2 turns, 2 steps
    python benchmarks/eval_composer.py --ablation no-icm-guidance          # psi = 0
    python benchmarks/eval_composer.py --ablation no-cfg                   # phi = 1
    python benchmarks/eval_composer.py --ablation teacher-forced

Ablations that need their own trained composer (without ICM, frozen / fully trainable CLIP) are
`--composer PATH` to weights made by `training.train_composer --no-icm` / `--eta 0` / `--eta 1`.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

PACK_DIR = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK_DIR / "benchmarks"))

from harness import comfy_env  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

PAPER_ICLEVR = [("CDD-ICM (paper)", 99.96, 85.66), ("LatteGAN (paper)", 97.26, 83.21), ("GeNeVA-GAN (paper)", 88.39, 74.02)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", choices=["trained", "untrained"], default="trained")
    ap.add_argument("--composer", type=pathlib.Path, default=None, help="composer weights to evaluate instead of the shipped")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--icm-scale", type=float, default=2.0)
    ap.add_argument("--ablation", choices=["none", "no-icm-guidance", "no-cfg", "teacher-forced"], default="none")
    ap.add_argument("--first-seed", type=int, default=10_000_000, help="held-out episodes start here")
    ap.add_argument("--quick", action="store_true", help="2 episodes, 2 turns, 2 steps (CI)")
    ap.add_argument("--json", type=pathlib.Path, default=None)
    ap.add_argument("--strip", type=pathlib.Path, default=None,
                    help="save the first episodes as a picture: the canvas, then each turn, ground truth above ours")
    ap.add_argument("--strip-episodes", type=int, default=3)
    args = ap.parse_args(argv)
    if args.quick:
        args.episodes, args.turns, args.steps = 2, 2, 2
    if args.ablation == "no-icm-guidance":
        args.icm_scale = 0.0
    if args.ablation == "no-cfg":
        args.cfg = 1.0

    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    env = comfy_env()
    glue = env.module("nodes.glue")
    multiturn = env.module("nodes.shapes_world.multiturn")
    models = env.module("nodes.shapes_world.models")
    composer_mod = env.module("nodes.shapes_world.composer")
    bundle = glue.load_composer(args.weights)
    if args.composer is not None:
        with torch.inference_mode(False):
            composer_mod.load_shipped_state(bundle.composer, models.load_weights(args.composer))
        bundle.trained, bundle.source = True, str(args.composer)
    print(f"composer: {bundle.source}; {args.episodes} held-out episodes x {args.turns} turns, {args.steps} DDIM steps, "
          f"cfg {args.cfg}, icm_scale {args.icm_scale}, {args.ablation}", flush=True)

    generated, truth, episodes, seconds = [], [], [], []
    bar = comfy.utils.ProgressBar(args.episodes * args.turns)
    with torch.inference_mode():
        for e in range(args.episodes):
            ep = multiturn.generate_episode(args.first_seed + e, turns=args.turns)
            episodes.append(ep)
            reference = torch.from_numpy(ep.background).float()[None] / 255
            images = []
            for k in range(args.turns):
                if args.ablation == "teacher-forced":
                    reference = torch.from_numpy(ep.reference(k)).float()[None] / 255
                t = time.perf_counter()
                out = glue.compose_turn(bundle, reference, ep.instructions[k], e * 100 + k, args.steps, args.cfg, args.icm_scale)
                seconds.append(time.perf_counter() - t)
                images.append((out[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8))
                reference = out
                bar.update(1)
            print(f"  episode {e + 1}/{args.episodes}: {np.mean(seconds[-args.turns:]):.2f} s/turn", flush=True)
            generated.append(np.stack(images))
            truth.append(ep.images)
    if args.strip:
        save_strip(episodes[:args.strip_episodes], generated, args.strip, args.ablation)
    result = multiturn.evaluate_turns(generated, truth)
    result.update(seconds_per_turn=float(np.median(seconds)), steps=args.steps, cfg=args.cfg, icm_scale=args.icm_scale,
                  ablation=args.ablation, composer=bundle.source, trained=bundle.trained)
    label = f"ours ({'trained' if bundle.trained else 'UNTRAINED'} shapes-world composer, {args.ablation})"
    print(f"\n| model | data | F1 | RSIM (last turn) |\n|---|---|---|---|")
    for name, f1, rs in PAPER_ICLEVR:
        print(f"| {name} | i-CLEVR | {f1:.2f} | {rs:.2f} |")
    print(f"| {label} | shapes-world multi-turn | {100 * result['f1']:.2f} | {100 * result['rsim_last_turn']:.2f} |")
    print("per turn F1: " + ", ".join(f"{100 * v:.1f}" for v in result["per_turn"]["f1"]))
    print(f"seconds per turn (median, CPU unless CUDA): {result['seconds_per_turn']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def save_strip(episodes, generated, path: pathlib.Path, label: str):
    """Per episode a caption row (each turn's instruction), the ground truth and ours; the first
    column is the canvas both start from."""
    import textwrap

    from PIL import Image, ImageDraw

    side, caption = 128, 40
    turns = generated[0].shape[0]
    rows = len(episodes)
    img = Image.new("RGB", ((turns + 1) * side + 40, rows * (caption + 2 * side + 8) + 16), "white")
    d = ImageDraw.Draw(img)
    d.text((4, 2), f"rows: ground truth, then ours ({label}); first column: the canvas", fill="black")
    for r, (ep, gen) in enumerate(zip(episodes, generated)):
        y = 16 + r * (caption + 2 * side + 8)
        d.text((4, y + caption + side // 2), "truth", fill="black")
        d.text((4, y + caption + side + side // 2), "ours", fill="black")
        for c in range(turns + 1):
            x = 40 + c * side
            if c:
                d.multiline_text((x + 2, y + 2), "\n".join(textwrap.wrap(ep.instructions[c - 1], 21)[:3]), fill="black",
                                 spacing=1)
            truth = ep.background if c == 0 else ep.images[c - 1]
            ours = ep.background if c == 0 else gen[c - 1]
            img.paste(Image.fromarray(truth), (x, y + caption))
            img.paste(Image.fromarray(ours), (x, y + caption + side))
    img.save(path)
    print(f"strip: {path}")


if __name__ == "__main__":
    sys.exit(main())
