"""benchmarks/prompt_subsets.py (segmentation-free guidance paper, Sec. 5.3): the distance curve falls
as subsets grow, the percentile picks are the right prompts, and the command runs end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import comfy_harness

BENCH = comfy_harness.PACK_DIR / "benchmarks"
sys.path.insert(0, str(BENCH))
import prompt_subsets  # noqa: E402


def test_frechet_distance_falls_as_the_subset_grows():
    """On a synthetic embedding set (correlated Gaussian, 16-d, 2000 points) the mean distance of
    random subsets to the whole set falls with every size, and a subset equal to the set is at 0."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2000, 16)) @ rng.normal(size=(16, 16)) + 3.0
    sizes = [20, 50, 100, 300, 1000]
    curve = prompt_subsets.subset_distances(features, sizes, draws=8, seed=1)
    means = [curve[s]["mean"] for s in sizes]
    assert all(a > b for a, b in zip(means, means[1:])), means
    assert means[-1] < means[0] / 10
    assert prompt_subsets.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    best = curve[50]
    assert len(best["best_subset"]) == 50 and len(set(best["best_subset"])) == 50
    assert prompt_subsets.frechet_distance(features[best["best_subset"]], features) == pytest.approx(min(best["distances"]))
    # the automatic size: the first whose mean is at most the fraction of the smallest size's mean
    expected = next(s for s in sizes if curve[s]["mean"] <= 0.2 * means[0])
    assert prompt_subsets.choose_subset_size(curve, 0.2) == expected
    with pytest.raises(ValueError, match="outside"):
        prompt_subsets.subset_distances(features[:10], [20], draws=1)


def test_percentile_picks_on_hand_made_scores():
    # prompt i has score scores[i]; ascending order of prompts: 3, 7, 0, 9, 5, 1, 8, 2, 6, 4 (ranks 0..9)
    scores = [30, 60, 80, 10, 99, 50, 90, 20, 70, 40]
    # p90 -> rank 8.1 -> rank 8 (prompt 6); p50 -> rank 4.5 -> tie 4/5, the higher: rank 5 (prompt 1); p10 -> rank 0.9 -> 1 (prompt 7)
    assert prompt_subsets.percentile_picks(scores, [90, 50, 10], 1) == [(90, 6), (50, 1), (10, 7)]
    # two per percentile: the nearest ranks, no prompt twice, highest first within a percentile
    picks = prompt_subsets.percentile_picks(scores, [90, 50, 10], 2)
    assert picks == [(90, 4), (90, 6), (50, 1), (50, 5), (10, 7), (10, 3)]
    assert prompt_subsets.percentile_picks(scores, [100, 0], 1) == [(100, 4), (0, 3)]
    # overlapping neighbourhoods: each prompt once
    picks = prompt_subsets.percentile_picks([1, 2, 3, 4], [50, 55], 2)
    assert len({i for _, i in picks}) == 4
    with pytest.raises(ValueError):
        prompt_subsets.percentile_picks(scores, [90, 50, 10], 4)


def test_the_plot_is_written(tmp_path):
    from PIL import Image

    curve = {s: {"distances": [1.0 / s, 2.0 / s], "mean": 1.5 / s} for s in (5, 10, 50)}
    prompt_subsets.plot_curve(curve, tmp_path / "c.png", "title", chosen=10)
    image = Image.open(tmp_path / "c.png")
    assert image.size == (760, 440) and len(set(image.getdata())) > 3


def test_the_command_runs_on_a_tiny_setting(tmp_path):
    """The whole tool through a real ComfyUI: shapes-world captions, the shipped dual encoder, CFG
    images from ComfyUI's KSampler (2 steps), the report files and the prompt list."""
    prompts_out = tmp_path / "data" / "chosen.txt"
    cmd = [sys.executable, str(BENCH / "prompt_subsets.py"), "--shapes-world", "24", "--sizes", "4,8,12", "--draws", "2",
           "--subset-size", "8", "--steps", "2", "--seeds", "1", "--per-percentile", "1", "--percentiles", "90,50,10",
           "--out-dir", str(tmp_path), "--name", "ps", "--prompts-out", str(prompts_out)]
    result = subprocess.run(cmd, cwd=comfy_harness.PACK_DIR, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "MC_COMFYUI": str(comfy_harness.COMFY_DIR)})
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "ps.json").read_text())
    assert data["prompts"] == 24 and data["subset_size"] == 8 and len(data["subset"]) == 8
    assert list(data["curve"]) == ["4", "8", "12"]
    assert len(data["subset_scores"]) == 8 and all(np.isfinite(data["subset_scores"]))
    chosen = [line for line in prompts_out.read_text().splitlines() if line and not line.startswith("#")]
    assert chosen == [row["prompt"] for row in data["chosen"]] and len(set(chosen)) == 3
    assert set(chosen) <= set(data["subset"])
    # the picks are the subset's prompts at those ranks of its scores
    order = np.argsort(data["subset_scores"], kind="stable")
    assert [data["subset"][order[r]] for r in (6, 4, 1)] == chosen  # ranks round(0.9*7)=6, 3.5 -> 4, 0.7 -> 1
    for suffix in (".png", ".samples.png", ".md"):
        assert (tmp_path / f"ps{suffix}").is_file()
    report = (tmp_path / "ps.md").read_text()
    assert "## Chosen prompts" in report and all(p in report for p in chosen)
