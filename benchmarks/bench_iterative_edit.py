"""MC_IterativeEdit: drift over 10 turns against naive chaining, and the per-turn overhead (issue 10).

1. Drift. A shapes-world scene is edited for `--turns` turns, each turn adding a shape in its own box
   mask (boxes overlap now and then, as real edit sessions do). Both chains run the *same* turn edit
   (VAE Encode, the blended latent sampler on the mask, VAE Decode) with the same seeds:
     * naive: each turn's decoded image, whole, is the next turn's reference (what chaining edit nodes
       does today: every pixel goes through the VAE once per turn);
     * ours: MC_IterativeEdit's loop, which pastes the previous image back outside each turn's mask.
   Per turn it prints the mean |drift| (0-255) of the pixels no mask has covered yet (against the
   source) and of the regions edited at earlier turns and left alone since (against their value right
   after their turn), and draws both curves for both chains to docs/iterative_edit_drift.png.
2. Overhead. Seconds per turn of MC_IterativeEdit (executed as a node, N turns) against one plain
   masked edit of core nodes (VAE Encode, Set Latent Noise Mask, KSampler, VAE Decode), interleaved
   A B A B and compared by medians.

    python benchmarks/bench_iterative_edit.py                     # shipped shapes-world models, 10 turns
    python benchmarks/bench_iterative_edit.py --quick --weights random   # CI: 3 turns, 2 steps
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

PACK_DIR = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK_DIR / "benchmarks"))

from harness import comfy_env  # noqa: E402  (real ComfyUI in this process, the pack loaded by its loader)

import numpy as np  # noqa: E402
import torch  # noqa: E402

SHAPES = ["red circle", "blue square", "yellow triangle", "green circle", "purple square", "orange triangle",
          "cyan circle", "pink square", "red triangle", "blue circle"]


def turn_plan(turns: int, size: int, box: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """Instructions and one box mask per turn at seeded places."""
    rng = np.random.default_rng(seed)
    masks = torch.zeros(turns, size, size, dtype=torch.bool)
    lines = []
    for k in range(turns):
        x, y = (int(v) for v in rng.integers(0, size - box, 2))
        masks[k, y:y + box, x:x + box] = True
        lines.append(f"a {SHAPES[k % len(SHAPES)]}")
    return lines, masks


def line_plot(series: dict[str, tuple[list[float], tuple[int, int, int], bool]], title: str, path: pathlib.Path,
              y_label: str) -> None:
    """A small line chart with pillow: {label: (values per turn, colour, dashed)}."""
    from PIL import Image, ImageDraw

    w, h, left, right, top, bottom = 760, 440, 70, 230, 40, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    turns = max(len(v) for v, _, _ in series.values())
    y_max = max(max(v) for v, _, _ in series.values())
    y_max = max(1.0, float(np.ceil(y_max * 1.1)))
    px = lambda k: left + (w - left - right) * k / max(turns - 1, 1)  # noqa: E731
    py = lambda v: h - bottom - (h - top - bottom) * v / y_max  # noqa: E731
    d.text((left, 6), title, fill="black")
    d.line([(left, top), (left, h - bottom), (w - right, h - bottom)], fill="black")
    for i in range(6):
        v = y_max * i / 5
        d.line([(left - 4, py(v)), (left, py(v))], fill="black")
        d.text((8, py(v) - 6), f"{v:.1f}", fill="black")
    for k in range(turns):
        d.text((px(k) - 4, h - bottom + 6), str(k + 1), fill="black")
    d.text(((w - right) / 2, h - 22), "turn", fill="black")
    d.text((8, top - 16), y_label, fill="black")
    for i, (label, (values, colour, dashed)) in enumerate(series.items()):
        points = [(px(k), py(v)) for k, v in enumerate(values)]
        if dashed:
            for a, b in zip(points, points[1:]):
                mid = ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)
                d.line([a, mid], fill=colour, width=3)
        else:
            d.line(points, fill=colour, width=3)
        for x, y in points:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        ly = top + 20 * i
        d.line([(w - right + 15, ly + 6), (w - right + 45, ly + 6)], fill=colour, width=3)
        d.text((w - right + 52, ly), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def draw_curves(naive: dict, ours: dict, turns: int, weights: str, path: pathlib.Path) -> None:
    line_plot({
        "naive: untouched": (naive["untouched"], (200, 40, 40), False),
        "naive: earlier edits": (naive["kept_edits"], (230, 140, 30), True),
        "ours: untouched (= 0)": (ours["untouched"], (30, 90, 200), False),
        "ours: earlier edits (= 0)": (ours["kept_edits"], (40, 160, 70), True),
    }, f"Drift over {turns} turns of masked edits ({weights} shapes-world models)", path, "mean |drift| (0-255)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", choices=["trained", "random"], default="trained")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (interleaved)")
    ap.add_argument("--timing-turns", type=int, default=3, help="turns of the node run timed against one plain edit")
    ap.add_argument("--scene-seed", type=int, default=10_000_123, help="held-out shapes-world scene")
    ap.add_argument("--quick", action="store_true", help="3 turns, 2 steps, 1 repeat (CI)")
    ap.add_argument("--plot", type=pathlib.Path, default=PACK_DIR / "docs" / "iterative_edit_drift.png")
    ap.add_argument("--json", type=pathlib.Path, default=None)
    ap.add_argument("--replot", type=pathlib.Path, default=None, metavar="JSON",
                    help="only redraw the plot from an earlier run's --json")
    args = ap.parse_args(argv)
    if args.replot:
        saved = json.loads(args.replot.read_text())
        draw_curves(saved["naive"], saved["ours"], saved["turns"], saved["weights"], args.plot)
        print(f"plot: {args.plot}")
        return 0
    if args.quick:
        args.turns, args.steps, args.repeats, args.timing_turns = 3, 2, 1, 2

    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    env = comfy_env()
    algo = env.module("nodes.algorithms.composition")
    glue = env.module("nodes.glue")
    composition = env.module("nodes.composition")
    models = env.module("nodes.shapes_world.models")
    world = env.module("nodes.shapes_world.world")
    bundle = models.load_bundle(args.weights)
    model, clip, vae = bundle["model"], bundle["clip"], bundle["vae"]

    scene = world.generate(args.scene_seed)
    source = torch.from_numpy(scene.image).float()[None] / 255.0
    size = source.shape[1]
    lines, masks = turn_plan(args.turns, size, size * 5 // 16, args.scene_seed)
    positives = [glue.encode_text(clip, line) for line in lines]
    negative = glue.encode_text(clip, "")
    editor = glue.TurnEditor(model, vae, positives, negative, 3, args.steps, args.cfg, "euler", "normal", 1.0)

    t0 = time.perf_counter()
    with torch.inference_mode():
        ours = algo.iterate_edits(source, args.turns, editor, masks)
        t_ours = time.perf_counter() - t0
        naive = algo.naive_chain(source, args.turns, editor, masks)
    ours_curves = algo.drift_curves(ours, source, masks)
    naive_curves = algo.drift_curves(naive, source, masks)
    print(f"MC_IterativeEdit drift over {args.turns} turns ({args.weights} shapes-world models, {args.steps} euler steps, "
          f"scene seed {args.scene_seed}); mean |drift| in 0-255 levels")
    print(f"{'turn':>4} | {'untouched: naive':>16} {'ours':>6} | {'earlier edits: naive':>20} {'ours':>6}")
    for k in range(args.turns):
        print(f"{k + 1:>4} | {naive_curves['untouched'][k]:16.3f} {ours_curves['untouched'][k]:6.3f} | "
              f"{naive_curves['kept_edits'][k]:20.3f} {ours_curves['kept_edits'][k]:6.3f}")
    union = algo.union_masks(masks)[-1]
    exact = bool(torch.equal(ours[-1][0][~union], source[0][~union]))
    print(f"after {args.turns} turns: every pixel outside all masks equals the source bit for bit: {exact} "
          f"({int((~union).sum())} pixels)")

    draw_curves(naive_curves, ours_curves, args.turns, args.weights, args.plot)
    print(f"plot: {args.plot}")

    # Overhead: the node (N turns) against one plain edit of core nodes, interleaved.
    nodes = env.nodes
    mask_one = masks[:1].float()

    def plain_edit():
        (latent,) = nodes.VAEEncode().encode(vae, source)
        (latent,) = nodes.SetLatentNoiseMask().set_mask(latent, mask_one)
        (out,) = nodes.KSampler().sample(model, 3, args.steps, args.cfg, "euler", "normal", positives[0], negative, latent,
                                         denoise=1.0)
        return nodes.VAEDecode().decode(vae, out)[0]

    def node_run():
        n = args.timing_turns
        return composition.IterativeEdit.execute(model, clip, vae, source, "\n".join(lines[:n]), "", 3, args.steps, args.cfg,
                                                 "euler", "normal", 1.0, 0.5, 256, masks[:n].float()).result

    with torch.inference_mode():
        plain_edit(), node_run()  # warm-up
        plain_t, node_t = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            plain_edit()
            plain_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            node_run()
            node_t.append((time.perf_counter() - t) / args.timing_turns)
    plain_s, turn_s = statistics.median(plain_t), statistics.median(node_t)
    print(f"one plain masked edit (VAEEncode+SetLatentNoiseMask+KSampler+VAEDecode): {plain_s:.3f} s; "
          f"MC_IterativeEdit per turn: {turn_s:.3f} s; ratio {turn_s / plain_s:.3f}x "
          f"(median of {args.repeats}, {args.steps} steps, CPU)")
    result = {"turns": args.turns, "steps": args.steps, "weights": args.weights, "scene_seed": args.scene_seed,
              "naive": naive_curves, "ours": ours_curves, "outside_all_masks_exact": exact,
              "timing_turns": args.timing_turns, "seconds_per_turn": turn_s, "plain_edit_seconds": plain_s, "overhead_ratio": turn_s / plain_s,
              "chain_seconds_ours": t_ours}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
