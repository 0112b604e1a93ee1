"""The main job, end to end, as the README tells a user to run it: one command starts ComfyUI with
the pack, runs the default workflow of workflows/ through the real frontend and server, shows
progress and writes the output images to a folder."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time

from PIL import Image

import comfy_harness

PACK_DIR = comfy_harness.PACK_DIR
README = PACK_DIR / "README.md"
DEFAULT_COMMAND = "python3 scripts/run_workflow.py --out outputs/"
COMMAND_PATTERN = re.compile(r"^\s*(?:\$\s*)?(\S*python\S*\s+scripts/run_workflow\.py\b.*?)\s*$", re.M)


def readme_command() -> str | None:
    if not README.exists():
        return None
    match = COMMAND_PATTERN.search(README.read_text())
    return match.group(1).strip("`") if match else None


def default_workflow_size() -> tuple[int, int]:
    """(width, height) of the images the default workflow makes, read from the workflow file."""
    import run_workflow  # scripts/ (standard library only at import)

    workflow = json.loads(run_workflow.default_workflow().read_text())
    for node in workflow["nodes"]:
        if node["type"] == "EmptyLatentImage":
            return node["widgets_values"][0] // 8 * 8, node["widgets_values"][1] // 8 * 8
        if node["type"] == "EmptyImage":
            return node["widgets_values"][0], node["widgets_values"][1]
    raise AssertionError("the default workflow has no EmptyLatentImage/EmptyImage to size its output")


def test_readme_documents_the_main_job():
    assert README.exists(), "README.md is missing"
    command = readme_command()
    assert command, f"README.md has no main-job command (a line like `{DEFAULT_COMMAND}`)"
    assert "run_workflow.py" in command


def test_main_job_end_to_end(tmp_path, artifacts, say):
    command = readme_command() or DEFAULT_COMMAND
    argv = shlex.split(command)
    out = tmp_path / "outputs"
    if "--out" in argv:
        argv[argv.index("--out") + 1] = str(out)
    else:
        argv += ["--out", str(out)]
    t0 = time.time()
    proc = subprocess.run(argv, cwd=PACK_DIR, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    elapsed = time.time() - t0
    log = proc.stdout + proc.stderr
    (artifacts / "main-job.log").write_text(f"$ {shlex.join(argv)}\n{log}")
    say(f"main job: `{shlex.join(argv)}` finished in {elapsed:.1f} s with exit code {proc.returncode}; "
        f"log {artifacts / 'main-job.log'}")
    assert proc.returncode == 0, f"the main job failed ({proc.returncode}):\n{log[-4000:]}"

    # It said what it was doing: the server's PID, node by node, sampler steps.
    assert re.search(r"ComfyUI http://127\.0\.0\.1:\d+ \(pid \d+", log), log[-3000:]
    assert "running #" in log and "status: success" in log, log[-3000:]
    steps = re.findall(r"\] (\d+)/(\d+)", log)
    if "KSampler" in log:
        assert steps and steps[-1][0] == steps[-1][1], f"no sampler progress shown:\n{log[-3000:]}"

    # The server is gone: stopped by its PID.
    pid = int(re.search(r"stopped ComfyUI \(pid (\d+)\)", log).group(1))
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive, f"the ComfyUI server (pid {pid}) is still running"

    written = sorted(out.glob("*.png"))
    assert written, f"no image in {out}:\n{log[-3000:]}"
    reported = re.findall(r"wrote (\S+\.png)", log)
    assert sorted(map(str, written)) == sorted(reported)
    size = default_workflow_size()
    for path in written:
        with Image.open(path) as image:
            image.verify()  # a complete, valid PNG
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size == size, f"{path.name}: {image.size}, expected {size}"
            assert "workflow" in image.info and "prompt" in image.info  # ComfyUI's embedded metadata
        (artifacts / f"main-job-{path.name}").write_bytes(path.read_bytes())
