#!/usr/bin/env python3
"""Build the shared UI-format workflows from their API-format sources, with the real frontend.

    python scripts/build_workflows.py [NAME ...] [--no-thumbnails] [--screenshots DIR]
    python scripts/build_workflows.py --check     # which UI files are missing or stale

For each `workflows/src/NAME.api.json` (all of them unless NAMEs are given) it:
  * opens the API graph in the ComfyUI page (`app.loadApiJson`), fixes seeds ('control after
    generate' = fixed), lays it out left to right and serializes it to `workflows/NAME.json`;
  * checks the round trip: the frontend converts the new UI file back to the same API graph;
  * runs it in the server and saves its first output image as the thumbnail `workflows/NAME.jpg`
    (a screenshot of the graph when the workflow saves no image).

Needs the ComfyUI installed by scripts/setup_comfyui.sh and Debian's chromium; run it with the
cache's venv Python (/root/.cache/more-control/venv/bin/python or ~/.cache/more-control/venv/bin/python).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import sys
import time

SCRIPTS = pathlib.Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from comfy_browser import ComfyPage  # noqa: E402
from comfy_server import CACHE, ComfyServer, make_base_directory  # noqa: E402

PACK_DIR = SCRIPTS.parent
WORKFLOWS = PACK_DIR / "workflows"
SOURCES = WORKFLOWS / "src"
THUMBNAIL_MIN_SIDE = 256
# Workflows that load real model files by name: the build links random-weight files under those names
# (scripts/dit_test_models.py) and their thumbnails say so.
MODEL_FILES = {"segfree_sd3": "sd3", "segfree_flux": "flux"}
RANDOM_WEIGHTS_CAPTION = "random weights: not a trained model"


def log(msg: str) -> None:
    print(f"[build_workflows] {msg}", flush=True)


def same_graph(a: dict, b: dict) -> list[str]:
    """Differences between an API source `a` and the frontend's conversion `b` in what runs: the same
    nodes and classes, every input of the source unchanged. Titles are ignored, and so are inputs only
    the frontend adds (a frontend-only widget such as PreviewAny's 'preview', optional defaults)."""
    diffs = []
    for node_id in sorted(set(a) | set(b), key=str):
        na, nb = a.get(node_id), b.get(node_id)
        if na is None or nb is None:
            diffs.append(f"node {node_id}: only in {'the source' if nb is None else 'the UI file'}")
        elif na["class_type"] != nb["class_type"]:
            diffs.append(f"node {node_id}: {na['class_type']} != {nb['class_type']}")
        else:
            for key, value in na.get("inputs", {}).items():
                if nb.get("inputs", {}).get(key, KeyError) != value:
                    diffs.append(f"node {node_id} ({na['class_type']}): input {key}: {value!r} in the source, "
                                 f"{nb.get('inputs', {}).get(key, '(missing)')!r} in the UI file")
    return diffs


def save_jpeg(png_bytes: bytes, path: pathlib.Path, caption: str | None = None) -> None:
    from PIL import Image, ImageDraw

    image = Image.open(io.BytesIO(png_bytes)).convert("RGB")
    short = min(image.size)
    if short < THUMBNAIL_MIN_SIDE:  # the demo models make 128x128 images; the templates browser shows ~300 px
        factor = THUMBNAIL_MIN_SIDE / short
        image = image.resize((round(image.width * factor), round(image.height * factor)), Image.LANCZOS)
    if caption:  # a band under the image, so the words never sit on (or get lost in) the picture
        band = 28
        framed = Image.new("RGB", (image.width, image.height + band), (0, 0, 0))
        framed.paste(image, (0, 0))
        draw = ImageDraw.Draw(framed)
        draw.text((8, image.height + 8), caption, fill=(255, 255, 255))
        image = framed
    image.save(path, "JPEG", quality=90)


def build(page: ComfyPage, server: ComfyServer, src: pathlib.Path, thumbnails: bool,
          screenshots: pathlib.Path | None = None) -> None:
    name = src.name[: -len(".api.json")]
    api = json.loads(src.read_text())
    t0 = time.time()
    ui = page.api_to_ui(api, name)
    back = page.ui_to_api(ui)
    diffs = same_graph(api, back)
    if diffs:
        raise RuntimeError(f"{name}: the UI workflow does not convert back to its source:\n  " + "\n  ".join(diffs))
    target = WORKFLOWS / f"{name}.json"
    target.write_text(json.dumps(ui, indent=2) + "\n")
    log(f"{target.relative_to(PACK_DIR)}: {len(ui['nodes'])} nodes, {len(ui['links'])} links "
        f"({time.time() - t0:.1f} s)")
    if screenshots is not None:
        page.load_workflow(ui, name)
        shot = page.screenshot(screenshots / f"{name}.png")
        log(f"screenshot of the graph: {shot}")
    if not thumbnails:
        return
    t0 = time.time()
    thumb = WORKFLOWS / f"{name}.jpg"
    entry = server.run_api_prompt(back, workflow=ui)
    # the saved image of the lowest node id: the same choice however the server ordered its outputs
    images = sorted(server.output_images(entry), key=lambda i: (int(i[0]) if str(i[0]).isdigit() else 1e9, i[1]["filename"]))
    if images:
        save_jpeg(images[0][2], thumb, caption=RANDOM_WEIGHTS_CAPTION if name in MODEL_FILES else None)
        log(f"{thumb.relative_to(PACK_DIR)}: first output image of node {images[0][0]} ({time.time() - t0:.1f} s)")
    else:
        page.load_workflow(ui, name)
        page.fit_view()
        page.screenshot(thumb, canvas_only=True)
        log(f"{thumb.relative_to(PACK_DIR)}: screenshot of the graph (no output image)")


def check(page: ComfyPage, sources: list[pathlib.Path]) -> int:
    stale = 0
    for src in sources:
        name = src.name[: -len(".api.json")]
        target = WORKFLOWS / f"{name}.json"
        if not target.exists():
            log(f"{name}: MISSING {target.relative_to(PACK_DIR)}")
            stale += 1
            continue
        diffs = same_graph(json.loads(src.read_text()), page.ui_to_api(json.loads(target.read_text())))
        if diffs or not target.with_suffix(".jpg").exists():
            log(f"{name}: STALE\n  " + "\n  ".join(diffs or ["no thumbnail"]))
            stale += 1
        else:
            log(f"{name}: up to date")
    return 1 if stale else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="names in workflows/src (NAME for NAME.api.json); default all")
    ap.add_argument("--no-thumbnails", action="store_true", help="only write the .json files")
    ap.add_argument("--check", action="store_true",
                    help="write nothing: report UI files that are missing or no longer match their source")
    ap.add_argument("--screenshots", type=pathlib.Path, metavar="DIR",
                    help="also save a screenshot of each graph in the ComfyUI page to DIR/NAME.png")
    args = ap.parse_args(argv)
    sources = sorted(SOURCES.glob("*.api.json"))
    if args.names:
        wanted = {n.removesuffix(".api.json") for n in args.names}
        sources = [s for s in sources if s.name[: -len(".api.json")] in wanted]
        missing = wanted - {s.name[: -len(".api.json")] for s in sources}
        if missing:
            raise SystemExit(f"no source for {sorted(missing)} in {SOURCES}")
    if not sources:
        raise SystemExit(f"nothing to build in {SOURCES}")
    base = make_base_directory(CACHE / "build-base")
    kinds = tuple(MODEL_FILES[s.name[: -len(".api.json")]] for s in sources if s.name[: -len(".api.json")] in MODEL_FILES)
    if kinds:
        import dit_test_models

        dit_test_models.install(base / "models", kinds)
    with ComfyServer(base, base / "comfyui.log") as server:
        log(f"ComfyUI {server.url} (pid {server.pid}); log {server.log_path}")
        with ComfyPage(server.url) as page:
            if args.check:
                return check(page, sources)
            for src in sources:
                build(page, server, src, thumbnails=not args.no_thumbnails, screenshots=args.screenshots)
            for e in page.pack_errors():
                log(f"browser console: {e}")
    return 0


if __name__ == "__main__":
    if pathlib.Path(sys.prefix).resolve() != (CACHE / "venv").resolve() and os.environ.get("MC_ANY_PYTHON") != "1":
        print(f"[build_workflows] note: run with {CACHE / 'venv' / 'bin' / 'python'} (has playwright and Pillow)",
              file=sys.stderr)
    sys.exit(main())
