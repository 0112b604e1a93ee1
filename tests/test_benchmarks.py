"""The benchmark scripts run (quick settings, random weights) and write what they promise.
They measure; they assert nothing about speed."""
import json
import pathlib
import subprocess
import sys

import pytest

import comfy_harness

BENCH = comfy_harness.PACK_DIR / "benchmarks"


def run(args, tmp_path, timeout=900):
    result = subprocess.run([sys.executable, *args], cwd=comfy_harness.PACK_DIR, capture_output=True, text=True, timeout=timeout,
                            env={**__import__("os").environ, "MC_COMFYUI": str(comfy_harness.COMFY_DIR)})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_segfree_benchmark_prints_the_ratio(tmp_path):
    out = run([str(BENCH / "bench_segfree.py"), "--steps", "3", "--repeats", "1", "--json", str(tmp_path / "r.json")], tmp_path)
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["label"] for r in rows] == ["SFG (start_percent 0.0) vs CFG", "SFG (start_percent 0.4) vs CFG"]
    for r in rows:
        # the ratio is the quotient of two timings of this run (per step, the settings asked for), each of real
        # sampling steps (a UNet step takes milliseconds, not microseconds), and it is the one printed
        assert r["steps"] == 3 and r["repeats"] == 1
        assert 1e-4 < r["baseline_s_per_step"] < 60 and 1e-4 < r["patched_s_per_step"] < 60
        assert r["ratio"] == pytest.approx(r["patched_s_per_step"] / r["baseline_s_per_step"], rel=1e-9)
        assert r["baseline_it_s"] == pytest.approx(1 / r["baseline_s_per_step"]) and r["patched_it_s"] == pytest.approx(1 / r["patched_s_per_step"])
        (line,) = [line for line in out.splitlines() if line.startswith(r["label"])]
        assert f"ratio {r['ratio']:5.3f}x" in line and f"baseline {r['baseline_s_per_step'] * 1000:8.2f} ms/step" in line
    # each row timed its own runs: no timing is reused
    timings = [r[k] for r in rows for k in ("baseline_s_per_step", "patched_s_per_step")]
    assert len(set(timings)) == len(timings)


def test_shapes_report_writes_every_table(tmp_path):
    out = run([str(BENCH / "shapes_report.py"), "--quick", "--weights", "random (untrained)", "--out", str(tmp_path / "results.md")], tmp_path)
    report = (tmp_path / "results.md").read_text()
    for heading in ("## Base text-to-image", "## Segmentation-free vs classifier-free guidance", "## Blended latent editing",
                    "## Semantic-guidance measures", "## Semantic diffusion guidance"):
        assert heading in report and heading in out
    assert (tmp_path / "results_segfree_vs_cfg.png").is_file()
    stats = json.loads((tmp_path / "results.json").read_text())
    # the quick settings ran (4 samples, 2 edits x 2 candidates), and the tables print the numbers of results.json
    semantic, blended = stats["semantic"], stats["blended"]
    # the guidance sweep: 3 samples a row, each kind's first two scales, the unguided row sampled once
    sdg = stats["sdg"]
    first_scales = {"text": 20, "content": 40, "structure": 40, "style": 10, "text+content": 40}
    assert sdg["samples"] == 3
    assert {(r["kind"], r["scale"]) for r in sdg["rows"]} == {(k, s) for k, v in first_scales.items() for s in (0, v)}
    unguided = [r for r in sdg["rows"] if r["scale"] == 0]
    assert len({r["diversity"] for r in unguided}) == 1  # the same samples in every scale-0 row
    assert (tmp_path / "sdg" / "sdg_sweep.jpg").is_file()
    assert semantic["samples"] == 4 and blended["candidates"] == 2 and blended["edits"] <= 2
    top = [semantic["top1"], semantic["top5"], semantic["top10"]]
    assert top == sorted(top) and all(round(v * 4) == v * 4 for v in top)  # counts out of 4 samples, nested
    assert f"| retrieval top-1 / top-5 / top-10 | {top[0]:.1%} / {top[1]:.1%} / {top[2]:.1%} |" in report
    assert f"| Fréchet distance to real scenes | {semantic['frechet']:.3f} |" in report
    if blended["edits"]:
        assert f"| in-mask precision (all candidates) | {blended['box']:.1%} |" in report
