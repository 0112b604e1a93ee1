"""The benchmark scripts run (quick settings, random weights) and write what they promise.
They measure; they assert nothing about speed."""
import json
import pathlib
import subprocess
import sys

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
    assert all(r["ratio"] > 0 for r in rows) and "ratio" in out


def test_shapes_report_writes_every_table(tmp_path):
    out = run([str(BENCH / "shapes_report.py"), "--quick", "--weights", "random (untrained)", "--out", str(tmp_path / "results.md")], tmp_path)
    report = (tmp_path / "results.md").read_text()
    for heading in ("## Base text-to-image", "## Segmentation-free vs classifier-free guidance", "## Blended latent editing",
                    "## Semantic-guidance measures"):
        assert heading in report and heading in out
    assert (tmp_path / "results_segfree_vs_cfg.png").is_file()
    stats = json.loads((tmp_path / "results.json").read_text())
    assert 0.0 <= stats["semantic"]["top10"] <= 1.0
