"""The pack in the real ComfyUI frontend, in Debian's headless chromium (scripts/comfy_browser.py).

No skip when chromium is missing: the `comfy_page` fixture fails and says how to install it.
"""
from __future__ import annotations

import json
import time


import comfy_harness

PACK_JS = "/extensions/more-control/more_control.js"
EXTENSION_NAME = "MoreControl.NodeStyle"
WORKFLOWS = comfy_harness.PACK_DIR / "workflows"


def pack_nodes(comfy_server) -> dict:
    info = comfy_server.get("/object_info")
    nodes = {name: d for name, d in info.items() if name.startswith("MC_")}
    assert nodes, "the server lists no MC_ node: the pack did not load (see the server log)"
    return nodes


# Cheap workflows that put pack nodes through the browser; the first that exists is used.
SHOWCASE = ("segfree_guider", "segfree_ksampler", "shapes_world_txt2img")


def showcase_workflow() -> str:
    """The pack's workflow for the browser test: a cheap one with MC_ nodes (core_smoke if none)."""
    for name in SHOWCASE:
        if (WORKFLOWS / f"{name}.json").exists():
            return f"{name}.json"
    files = sorted(WORKFLOWS.glob("*.json"))
    assert files, f"no workflows in {WORKFLOWS}"
    with_pack = [p for p in files if any(n["type"].startswith("MC_") for n in json.loads(p.read_text())["nodes"])]
    return min(with_pack or files, key=lambda p: p.stat().st_size).name


def test_server_lists_the_pack_script(comfy_server):
    assert PACK_JS in comfy_server.get("/extensions")


def test_pack_extension_registered(comfy_page):
    names = comfy_page.extension_names()
    assert EXTENSION_NAME in names, f"registered extensions: {names}"
    assert comfy_page.evaluate("() => window.app.extensionManager.setting.get('MoreControl.ColorNodes')") is True


def test_frontend_knows_every_pack_node(comfy_server, comfy_page):
    known = set(comfy_page.node_types())
    missing = sorted(set(pack_nodes(comfy_server)) - known)
    assert not missing, f"the frontend has no node type for {missing}"


def test_every_pack_node_has_a_help_page(comfy_server):
    """The frontend's node help fetches /extensions/<pack>/docs/<NodeId>.md for a custom node."""
    missing = []
    for name, definition in pack_nodes(comfy_server).items():
        pack = definition["python_module"].split(".")[1]
        try:
            text = comfy_server.get_bytes(f"/extensions/{pack}/docs/{name}.md").decode()
        except OSError as e:
            missing.append(f"{name} ({e})")
            continue
        if len(text.strip()) < 40:
            missing.append(f"{name} (almost empty)")
    assert not missing, f"no help page web/docs/<NodeId>.md for: {missing}"


def test_open_and_run_a_pack_workflow(comfy_server, comfy_page, artifacts, say):
    """Open one of the pack's workflows as a user does, run it with the Run button's code path,
    screenshot the result, and check the console has nothing from the pack's extension."""
    name = showcase_workflow()
    workflow = json.loads((WORKFLOWS / name).read_text())
    comfy_page.load_workflow(workflow, name)
    graph = comfy_page.evaluate("() => window.app.graph.nodes.map(n => ({id: n.id, type: n.type, color: n.color}))")
    assert sorted(n["id"] for n in graph) == sorted(n["id"] for n in workflow["nodes"])
    for node in graph:
        if node["type"].startswith("MC_"):
            assert node["color"], f"the pack's extension did not colour {node['type']} #{node['id']}"

    t0 = time.time()
    prompt_id = comfy_page.queue()
    entry = comfy_server.wait_history(prompt_id)
    assert entry["status"]["status_str"] == "success"
    assert comfy_server.output_images(entry), "the workflow saved no image"
    # the page shows the result: wait until the frontend has the output image for a node
    comfy_page.page.wait_for_function("() => Object.keys(window.app.nodeOutputs || window.app._nodeOutputs || {}).length > 0"
                                      " || Object.keys(window.app.nodePreviewImages || {}).length > 0",
                                      timeout=30000)
    comfy_page.fit_view()
    shot = comfy_page.screenshot(artifacts / f"browser-{pathlib_stem(name)}.png")
    say(f"browser screenshot: {shot} ({name} opened with loadGraphData, run with the Run button's "
        f"queuePrompt in {time.time() - t0:.1f} s)")
    assert shot.stat().st_size > 10_000

    errors = comfy_page.pack_errors()
    assert not errors, "console errors from the pack's extension:\n" + "\n".join(map(str, errors))


def pathlib_stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def test_no_pack_error_in_console(comfy_page, say):
    """Every message the page logged that mentions the pack (errors and page exceptions)."""
    errors = comfy_page.pack_errors()
    assert not errors, "\n".join(map(str, errors))
    if comfy_page.errors():
        kinds = sorted({(e.url.split("?")[0] or e.text[:60]) for e in comfy_page.errors()})
        say(f"console: {len(comfy_page.errors())} errors, none from the pack (stock frontend, offline): "
            + "; ".join(k[:80] for k in kinds[:6]))


def test_colour_setting_switches_the_pack_colours(comfy_page):
    """The extension's setting (Settings > More Control) takes the pack's colours off and puts them back."""
    name = showcase_workflow()
    comfy_page.load_workflow(json.loads((WORKFLOWS / name).read_text()), name)
    colours = "() => window.app.graph.nodes.filter(n => n.type.startsWith('MC_')).map(n => n.color ?? null)"
    setting = "(v) => window.app.extensionManager.setting.set('MoreControl.ColorNodes', v)"
    assert comfy_page.evaluate(colours) and all(comfy_page.evaluate(colours))
    try:
        comfy_page.evaluate(setting, False)
        assert not any(comfy_page.evaluate(colours))
    finally:
        comfy_page.evaluate(setting, True)
    assert all(comfy_page.evaluate(colours))
    assert not comfy_page.pack_errors()
