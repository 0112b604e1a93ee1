"""Every shared workflow (workflows/*.json, ComfyUI's UI format) runs through the real ComfyUI server.

The real frontend converts each file to the API format (as its Run button does), the server
runs it (POST /prompt, /history), and the images it saved are fetched through /view and checked.
"""
from __future__ import annotations

import io
import json
import pathlib
import time

import pytest
from PIL import Image

import build_workflows  # scripts/
import comfy_harness

WORKFLOWS = comfy_harness.PACK_DIR / "workflows"
WORKFLOW_FILES = sorted(WORKFLOWS.glob("*.json"))
SIZE_SOURCES = ("EmptyLatentImage", "EmptySD3LatentImage", "EmptyImage")
LATENT_SOURCES = ("EmptyLatentImage", "EmptySD3LatentImage")
# Workflows that load models by file name: their random-weight files (scripts/dit_test_models.py)
# are linked into the server's models folder before they run.
MODEL_FILES = {"segfree_sd3": "sd3", "segfree_flux": "flux"}


# Nodes whose output image/latent has the size of one input: (class, that input).
SIZE_PRESERVING = {"VAEDecode": "samples", "KSampler": "latent_image", "KSamplerAdvanced": "latent_image",
                   "SamplerCustom": "latent_image", "SamplerCustomAdvanced": "latent_image",
                   "ImageInvert": "image", "SaveImage": "images", "PreviewImage": "images"}


def size_source(api: dict, node_id: str) -> dict | None:
    """The EmptyLatentImage/EmptyImage an output node's images come from through size-preserving
    nodes only (None when the chain passes anything else: stitching, maps, crops...)."""
    node = api[node_id]
    while node["class_type"] in SIZE_PRESERVING:
        link = node["inputs"].get(SIZE_PRESERVING[node["class_type"]])
        if not (isinstance(link, list) and str(link[0]) in api):
            return None
        node = api[str(link[0])]
    return node if node["class_type"] in SIZE_SOURCES else None


def expected_size(api: dict, node_id: str) -> tuple[int, int, int] | None:
    """(width, height, batch) of the images an output node saves, when the graph says it plainly."""
    source = size_source(api, node_id)
    if source is None:
        return None
    w, h, batch = (source["inputs"].get(k) for k in ("width", "height", "batch_size"))
    if not all(isinstance(v, int) for v in (w, h, batch)):
        return None
    return (w // 8 * 8, h // 8 * 8, batch) if source["class_type"] in LATENT_SOURCES else (w, h, batch)


def test_workflows_folder_is_complete():
    assert WORKFLOW_FILES, f"no workflows in {WORKFLOWS}"
    for path in WORKFLOW_FILES:
        workflow = json.loads(path.read_text())
        assert "nodes" in workflow and "links" in workflow, f"{path.name} is not in ComfyUI's UI format"
        assert path.with_suffix(".jpg").is_file(), f"{path.name} has no thumbnail {path.with_suffix('.jpg').name}"
        assert Image.open(path.with_suffix(".jpg")).format == "JPEG"
    unbuilt = [src.name for src in sorted((WORKFLOWS / "src").glob("*.api.json"))
               if not (WORKFLOWS / src.name.replace(".api.json", ".json")).exists()]
    assert not unbuilt, f"API sources without their UI workflow: {unbuilt} (run scripts/build_workflows.py)"


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.stem)
def test_workflow_runs_in_the_server(path: pathlib.Path, run_workflow_file, comfy_server, artifacts, say):
    if path.stem in MODEL_FILES:
        import dit_test_models  # scripts/

        dit_test_models.install(comfy_server.base / "models", (MODEL_FILES[path.stem],))
    t0 = time.time()
    api, entry, images = run_workflow_file(path)
    assert entry["status"]["status_str"] == "success"
    say(f"workflows/{path.name}: {len(api)} nodes executed by the server in {time.time() - t0:.1f} s; "
        f"images {[i[1]['filename'] for i in images]}")

    # The UI file is what its API source says (scripts/build_workflows.py keeps them in step).
    source = WORKFLOWS / "src" / f"{path.stem}.api.json"
    if source.exists():
        diffs = build_workflows.same_graph(json.loads(source.read_text()), api)
        assert not diffs, (f"{path.name} no longer matches {source.name} (rebuild it with "
                           f"scripts/build_workflows.py {path.stem}):\n  " + "\n  ".join(diffs))

    save_nodes = [nid for nid, node in api.items() if node["class_type"] == "SaveImage"]
    sampled = any(node["class_type"].startswith(("KSampler", "SamplerCustom")) for node in api.values())
    assert save_nodes, f"{path.name} saves no image"
    for nid in save_nodes:
        mine = [(record, data) for node_id, record, data in images if node_id == nid]
        expected = expected_size(api, nid)
        assert mine, f"SaveImage #{nid} saved no image"
        if expected:
            assert len(mine) == expected[2], f"SaveImage #{nid} saved {len(mine)} images, expected {expected[2]}"
        for record, data in mine:
            image = Image.open(io.BytesIO(data))
            image.load()
            assert image.format == "PNG" and image.mode == "RGB"
            assert image.width >= 8 and image.height >= 8
            if expected:
                assert image.size == expected[:2], f"{record['filename']}: {image.size}, expected {expected[:2]}"
            if sampled and expected:  # a sampled, decoded image: NaNs or a dead decoder give one flat colour
                assert any(lo < hi for lo, hi in image.getextrema()), f"{record['filename']} is one flat colour"
            # SaveImage embeds the API prompt and the UI workflow the frontend sent.
            assert json.loads(image.info["prompt"]) == api
            assert "nodes" in json.loads(image.info["workflow"])
            (artifacts / f"server-{path.stem}-{record['filename']}").write_bytes(data)


def test_core_smoke_pixels(run_workflow_file):
    """The core-nodes workflow computes what it says: an inverted solid colour."""
    api, entry, images = run_workflow_file("core_smoke.json")
    colour = api["1"]["inputs"]["color"]
    rgb = ((colour >> 16) & 255, (colour >> 8) & 255, colour & 255)
    image = Image.open(io.BytesIO(images[0][2])).convert("RGB")
    assert image.size == (api["1"]["inputs"]["width"], api["1"]["inputs"]["height"])
    expected = tuple(255 - c for c in rgb)
    # SaveImage truncates 255 * x to uint8: float32 rounding may land one below
    for pixel in set(image.getdata()):
        assert all(0 <= e - p <= 1 for p, e in zip(pixel, expected)), f"{pixel} != inverted colour {expected}"


def test_server_reports_a_broken_workflow(comfy_server):
    """The harness fails loudly: an invalid prompt is refused with ComfyUI's own node error."""
    broken = {"1": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 8, "batch_size": 1, "color": 0}},
              "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "broken"}}}
    with pytest.raises(AssertionError, match="POST /prompt -> 400.*width"):
        comfy_server.run_api_prompt(broken)


def test_templates_browser_lists_the_workflows(comfy_server):
    """ComfyUI's templates browser offers every shared workflow, with its thumbnail."""
    templates = comfy_server.get("/workflow_templates")
    assert sorted(templates.get("more-control", [])) == sorted(p.stem for p in WORKFLOW_FILES), templates
    name = WORKFLOW_FILES[0].stem
    served = json.loads(comfy_server.get_bytes(f"/api/workflow_templates/more-control/{name}.json"))
    assert served == json.loads((WORKFLOWS / f"{name}.json").read_text())
    thumb = comfy_server.get_bytes(f"/api/workflow_templates/more-control/{name}.jpg")
    assert thumb[:3] == b"\xff\xd8\xff"
