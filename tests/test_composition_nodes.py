"""The CDD-ICM nodes (MC_CompositionModelLoader, MC_ComposeTurn, MC_IterativeComposition) through ComfyUI's
executor on the UNTRAINED composer (the shapes-world encoders and UNet with zero-initialised extras): the
graph runs, every turn comes out, each turn starts from the previous one, and bad inputs are named.

Run: python -m pytest tests/test_composition_nodes.py -q
"""
from __future__ import annotations

import pytest
import torch

import composition_fixtures as fixtures


@pytest.fixture(scope="module")
def registered(comfy_nodes):
    fixtures.register(comfy_nodes)


def graph(instructions: str, steps: int = 2) -> dict:
    return {
        "1": {"class_type": "MC_CompositionModelLoader", "inputs": {"weights": "untrained"}},
        "2": {"class_type": "MCTest_GivenImage", "inputs": {"name": "canvas"}},
        "3": {"class_type": "MC_IterativeComposition", "inputs": {
            "composer": ["1", 0], "canvas": ["2", 0], "instructions": instructions, "seed": 1, "steps": steps,
            "cfg": 3.0, "icm_scale": 2.0, "max_turns": 4}},
        "4": {"class_type": "MCTest_Capture", "inputs": {"name": "turns", "image": ["3", 0]}},
        "5": {"class_type": "MC_ComposeTurn", "inputs": {
            "composer": ["1", 0], "reference": ["2", 0], "instruction": "add a red square in the middle", "seed": 1,
            "steps": steps, "cfg": 3.0, "icm_scale": 2.0}},
        "6": {"class_type": "MCTest_Capture", "inputs": {"name": "turn", "image": ["5", 0]}},
    }


def test_iterative_composition_runs_every_turn(registered, run_prompt, pack_module):
    world = pack_module("nodes.shapes_world.world")
    import numpy as np

    canvas = torch.from_numpy(world.render([], "plain", np.random.default_rng(0))).float()[None] / 255
    fixtures.TENSORS.update(canvas=canvas)
    run_prompt(graph("add a red square in the middle\nadd a blue circle to the left of the red square"))
    turns, single = fixtures.CAPTURED["turns"], fixtures.CAPTURED["turn"]
    assert turns.shape == (2, 128, 128, 3) and single.shape == (1, 128, 128, 3)
    assert torch.isfinite(turns).all() and 0 <= float(turns.min()) and float(turns.max()) <= 1
    # the first turn of the list is Compose Turn on the canvas with the same seed and instruction
    assert torch.allclose(turns[0], single[0], atol=1e-5)
    assert not torch.allclose(turns[1], turns[0])


@pytest.mark.parametrize("text,message", [("", "is blank"), ("a\n\nb", "line 2 is blank"), ("a\nb\nc\nd\ne", "more than the limit of 4")])
def test_instruction_errors_are_named(registered, run_prompt, text, message):
    fixtures.TENSORS.update(canvas=torch.zeros(1, 128, 128, 3))
    with pytest.raises(RuntimeError, match=f"MC_IterativeComposition: input 'instructions': .*{message}"):
        run_prompt({k: v for k, v in graph(text).items() if k in ("1", "2", "3", "4")})


def test_evaluation_command_reports_the_table(tmp_path):
    """benchmarks/eval_composer.py on one episode of two turns (CI's tiny setting): the table beside the
    paper's marks, per-turn F1, RSIM in [0, 1], seconds per turn."""
    import json
    import os
    import subprocess
    import sys

    import comfy_harness

    out, md = tmp_path / "eval.json", tmp_path / "composer_results.md"
    cmd = [sys.executable, str(comfy_harness.PACK_DIR / "benchmarks" / "eval_composer.py"), "--weights", "untrained",
           "--episodes", "1", "--turns", "2", "--steps", "1", "--ablation", "none", "teacher-forced",
           "--json", str(out), "--markdown", str(md), "--strip", str(tmp_path / "strip.png")]
    proc = subprocess.run(cmd, cwd=comfy_harness.PACK_DIR, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, MC_COMFYUI=str(comfy_harness.COMFY_DIR)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| CDD-ICM (paper) | i-CLEVR | 99.96 | 85.66 |" in proc.stdout and "UNTRAINED" in proc.stdout
    results = json.loads(out.read_text())
    assert set(results) == {"none", "teacher-forced"}
    for result in results.values():
        assert len(result["per_turn"]["f1"]) == 2 and 0.0 <= result["rsim_last_turn"] <= 1.0
        assert result["seconds_per_turn"] > 0 and result["trained"] is False
    # turn 1 starts from the same canvas with the same seed either way: the same image, the same scores
    assert results["none"]["per_turn"]["f1"][0] == results["teacher-forced"]["per_turn"]["f1"][0]
    section = md.read_text()
    assert section.startswith("## Multi-turn composition (issue 10)")
    assert "| ground truth through our detector | shapes world | 100.00 | 100.00 |" in section
    assert "| teacher-forced (ground-truth references), UNTRAINED composer |" in section
    from PIL import Image

    with Image.open(tmp_path / "strip.png") as strip:  # canvas + 2 turns, truth above ours
        assert strip.size == (3 * 128 + 40, 16 + 40 + 2 * 128 + 8)
