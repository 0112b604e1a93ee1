"""Evaluate the shapes-world CDD-ICM composer as GeNeVA evaluates i-CLEVR models (issue 10): on held-out
multi-turn episodes, generate every turn iteratively (each output the next reference) or teacher-forced
(each turn from the ground-truth reference), run the shapes-world detector on generated and ground-truth
images alike, and report precision / recall / F1 per turn, F1 over all turns, and RSIM on the last
turn, beside the paper's i-CLEVR marks. Also seconds per turn on this machine.

    python benchmarks/eval_composer.py --episodes 50 --steps 25            # the shipped (or untrained) composer
    python benchmarks/eval_composer.py --quick --weights untrained         # CI: 2 episodes, 2 turns, 2 steps
    python benchmarks/eval_composer.py --ablation none no-icm-guidance no-cfg teacher-forced \
        --markdown docs/composer_results.md --strip docs/composer_turns.png    # the table of docs/results.md

The ablations at sampling time: no-icm-guidance (psi = 0), no-cfg (phi = 1), teacher-forced (each turn
from the ground-truth reference); each is a row over the same episodes and seeds.

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


ABLATIONS = {"none": "CDD-ICM (ours, iterative)", "no-icm-guidance": "without ICM guidance (psi = 0)",
             "no-cfg": "without CFG (phi = 1)", "teacher-forced": "teacher-forced (ground-truth references)"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", choices=["trained", "untrained"], default="trained")
    ap.add_argument("--composer", type=pathlib.Path, default=None, help="composer weights to evaluate instead of the shipped")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--icm-scale", type=float, default=2.0)
    ap.add_argument("--ablation", choices=list(ABLATIONS), nargs="+", default=["none"],
                    help="one or more settings, each a row of the table (the same episodes and seeds)")
    ap.add_argument("--first-seed", type=int, default=10_000_000, help="held-out episodes start here")
    ap.add_argument("--quick", action="store_true", help="2 episodes, 2 turns, 2 steps (CI)")
    ap.add_argument("--json", type=pathlib.Path, default=None)
    ap.add_argument("--markdown", type=pathlib.Path, default=None, help="write the table as a results section")
    ap.add_argument("--strip", type=pathlib.Path, default=None,
                    help="save the first episodes of the first setting as a picture: the canvas, then each turn, "
                         "ground truth above ours")
    ap.add_argument("--strip-episodes", type=int, default=3)
    args = ap.parse_args(argv)
    if args.quick:
        args.episodes, args.turns, args.steps = 2, 2, 2

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
    episodes = [multiturn.generate_episode(args.first_seed + e, turns=args.turns) for e in range(args.episodes)]
    results, started = {}, time.time()
    for ablation in args.ablation:
        cfg = 1.0 if ablation == "no-cfg" else args.cfg
        icm_scale = 0.0 if ablation == "no-icm-guidance" else args.icm_scale
        print(f"composer: {bundle.source}; {args.episodes} held-out episodes x {args.turns} turns, {args.steps} DDIM "
              f"steps, cfg {cfg}, icm_scale {icm_scale}, {ablation}", flush=True)
        generated, seconds = generate(glue, bundle, episodes, args.turns, args.steps, cfg, icm_scale,
                                      teacher_forced=ablation == "teacher-forced")
        if args.strip and not results:
            save_strip(episodes[:args.strip_episodes], generated, args.strip, ABLATIONS[ablation])
        result = multiturn.evaluate_turns(generated, [ep.images for ep in episodes])
        result.update(seconds_per_turn=float(np.median(seconds)), steps=args.steps, cfg=cfg, icm_scale=icm_scale,
                      ablation=ablation, composer=bundle.source, trained=bundle.trained)
        results[ablation] = result
    truth = multiturn.evaluate_turns([ep.images for ep in episodes], [ep.images for ep in episodes])
    table = markdown_table(results, truth, bundle.trained)
    print("\n" + table)
    first = results[args.ablation[0]]
    if args.json:
        args.json.write_text(json.dumps(first if len(results) == 1 else results, indent=2))
    if args.markdown:
        command = "python benchmarks/eval_composer.py " + " ".join(argv if argv is not None else sys.argv[1:])
        args.markdown.write_text(f"""## Multi-turn composition (issue 10)

*Written by `{command}` on {time.strftime('%Y-%m-%d')} in {time.time() - started:.0f} s; composer
`{pathlib.Path(bundle.source).name if bundle.trained else bundle.source}`. {args.episodes} held-out shapes-world
episodes (seeds from {args.first_seed}) x {args.turns} turns, {args.steps} deterministic DDIM steps, cfg {args.cfg},
ICM guidance {args.icm_scale}. The detector runs on generated and ground-truth images alike (GeNeVA's
protocol): F1 over every turn's objects, RSIM on the last turn.*

{table}
""")
        print(f"wrote {args.markdown}")
    return 0


def generate(glue, bundle, episodes, turns: int, steps: int, cfg: float, icm_scale: float, teacher_forced: bool):
    """Every turn of every episode: each output the next turn's reference (iterative), or each turn from
    the ground-truth reference (teacher-forced). Returns (uint8 [T, H, W, 3] per episode, seconds per turn)."""
    import comfy.utils

    generated, seconds = [], []
    bar = comfy.utils.ProgressBar(len(episodes) * turns)
    with torch.inference_mode():
        for e, ep in enumerate(episodes):
            reference = torch.from_numpy(ep.background).float()[None] / 255
            images = []
            for k in range(turns):
                if teacher_forced:
                    reference = torch.from_numpy(ep.reference(k)).float()[None] / 255
                t = time.perf_counter()
                out = glue.compose_turn(bundle, reference, ep.instructions[k], e * 100 + k, steps, cfg, icm_scale)
                seconds.append(time.perf_counter() - t)
                images.append((out[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8))
                reference = out
                bar.update(1)
            print(f"  episode {e + 1}/{len(episodes)}: {np.mean(seconds[-turns:]):.2f} s/turn", flush=True)
            generated.append(np.stack(images))
    return generated, seconds


def markdown_table(results: dict, truth: dict, trained: bool) -> str:
    """The paper's i-CLEVR marks, the detector on ground truth, then a row per setting of ours."""
    turns = len(truth["per_turn"]["f1"])
    lines = ["| model | data | F1 | RSIM (last turn) | F1 per turn | s / turn |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | i-CLEVR | {f1:.2f} | {rs:.2f} | | |" for name, f1, rs in PAPER_ICLEVR]
    lines.append(f"| ground truth through our detector | shapes world | {100 * truth['f1']:.2f} | "
                 f"{100 * truth['rsim_last_turn']:.2f} | | |")
    for ablation, r in results.items():
        name = ABLATIONS[ablation] + ("" if trained else ", UNTRAINED composer")
        per_turn = " / ".join(f"{100 * v:.0f}" for v in r["per_turn"]["f1"])
        lines.append(f"| {name} | shapes world, {turns} turns | {100 * r['f1']:.2f} | {100 * r['rsim_last_turn']:.2f} | "
                     f"{per_turn} | {r['seconds_per_turn']:.2f} |")
    return "\n".join(lines)


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
