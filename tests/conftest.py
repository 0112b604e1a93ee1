"""Fixtures: the pack loaded by ComfyUI's own loader, tiny models, ComfyUI's executor and server.

`comfy_harness` (a `-p` plugin) has already set ComfyUI's arguments and sys.path.
"""
from __future__ import annotations

import asyncio
import json
import os
import pathlib
import sys
import time

import pytest

import comfy_harness
import tiny_models

ARTIFACTS = pathlib.Path(os.environ.get("MC_TEST_ARTIFACTS", comfy_harness.PACK_DIR / "test-artifacts"))


@pytest.fixture(scope="session")
def artifacts() -> pathlib.Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def run_coroutine(coroutine):
    """asyncio.run in a thread of its own: the test thread may hold a running event loop
    (Playwright's sync API keeps one while a browser is open)."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


@pytest.fixture(scope="session")
def comfy_nodes():
    """ComfyUI's `nodes` module with its built-in extra nodes and the custom nodes of the base
    directory (only this pack) loaded by ComfyUI's own loader."""
    import nodes

    run_coroutine(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    return nodes


@pytest.fixture(scope="session")
def pack(comfy_nodes):
    """The pack's package object as ComfyUI's loader imported it."""
    link = comfy_harness.BASE_DIR / "custom_nodes" / comfy_harness.PACK_LINK_NAME
    key = str(link).replace(".", "_x_")
    assert key in sys.modules, f"ComfyUI did not load the pack from {link}"
    return sys.modules[key]


@pytest.fixture(scope="session")
def pack_module(pack):
    """Import one of the pack's submodules by dotted name, e.g. pack_module('nodes.algorithms.segfree')."""
    import importlib

    return lambda dotted: importlib.import_module(f"{pack.__name__}.{dotted}")


@pytest.fixture(scope="session")
def glue(pack_module):
    """The pack's ComfyUI glue (nodes/glue/)."""
    return pack_module("nodes.glue")


@pytest.fixture(scope="session")
def sf(pack_module):
    """Segmentation-free guidance's plain-torch algorithm."""
    return pack_module("nodes.algorithms.segfree")


@pytest.fixture(scope="session")
def nodes_sf(pack_module):
    """Segmentation-free guidance's nodes."""
    return pack_module("nodes.segfree")


@pytest.fixture(scope="session")
def tiny_sd15():
    return tiny_models.tiny_model("sd15", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl():
    return tiny_models.tiny_model("sdxl", seed=1)


@pytest.fixture(scope="session")
def tiny_clip():
    return tiny_models.tiny_clip(seed=2)


@pytest.fixture(scope="session")
def tiny_vae():
    return tiny_models.tiny_vae(seed=3)


@pytest.fixture(scope="session")
def executor(comfy_nodes):
    """ComfyUI's own PromptExecutor attached to a real (not listening) PromptServer."""
    import execution
    import server

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    prompt_server = server.PromptServer(loop)
    return execution.PromptExecutor(prompt_server, cache_args={"lru": 0, "ram": 16.0})


@pytest.fixture(scope="session")
def run_prompt(executor):
    """Validate and execute an API-format prompt in-process; returns the ui outputs by node id.
    A failed run raises with ComfyUI's own error message.

    Like ComfyUI's own prompt worker, the executor runs in a thread of its own: the test thread may
    hold a running event loop (Playwright's sync API keeps one while a browser is open)."""
    import concurrent.futures
    import uuid

    import execution

    worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prompt_worker")

    def execute(prompt: dict) -> dict:
        valid = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))
        # ComfyUI accepts a prompt when any output is valid and drops the broken branches: a test
        # must see those errors, not a partial run.
        if not valid[0] or valid[3]:
            raise AssertionError(f"ComfyUI rejected (part of) the prompt: {valid[1]} {valid[3]}")
        executor.execute(prompt, str(uuid.uuid4()), {}, valid[2])
        if not executor.success:
            errors = [m for m in executor.status_messages if m[0] == "execution_error"]
            raise RuntimeError(errors[-1][1] if errors else executor.status_messages)
        return executor.history_result["outputs"]

    yield lambda prompt: worker.submit(execute, prompt).result()
    worker.shutdown()


# ---------------------------------------------------------------------------------------------
# The real server, started as a user would start it, on a free loopback port, stopped by its PID
# (scripts/comfy_server.py, shared with the main job), and the real frontend in headless chromium
# (scripts/comfy_browser.py).

sys.path.append(str(comfy_harness.PACK_DIR / "scripts"))  # appended: ComfyUI's modules stay first
import comfy_server as _comfy_server  # noqa: E402

free_port = _comfy_server.free_port
WORKFLOWS_DIR = comfy_harness.PACK_DIR / "workflows"


class ComfyServer(_comfy_server.ComfyServer):
    """`main.py --cpu` of the ComfyUI on the tests' sys.path, run by this Python."""

    def __init__(self, base: pathlib.Path, log_path: pathlib.Path):
        super().__init__(base, log_path, comfy_dir=comfy_harness.COMFY_DIR, python=sys.executable)


@pytest.fixture(scope="session")
def say(request):
    """Write a line to the terminal even while pytest captures output (for CI logs: the server's
    PID, the screenshot's path, which workflow ran)."""
    import contextlib

    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def write(message: str) -> None:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            if reporter is not None:
                reporter.ensure_newline()
                reporter.write_line(message)
            else:
                print(message)

    return write


@pytest.fixture(scope="session")
def comfy_server(artifacts, say):
    base = comfy_harness.make_base_directory(pathlib.Path(comfy_harness.BASE_DIR.parent / (comfy_harness.BASE_DIR.name + "-server")))
    t0 = time.time()
    server = ComfyServer(base, artifacts / "comfyui-server.log").start()
    say(f"ComfyUI server at {server.url} (pid {server.proc.pid}) started in {time.time() - t0:.1f} s, "
        f"log {server.log_path}")
    yield server
    server.stop()
    say(f"ComfyUI server (pid {server.proc.pid}) stopped: exit code {server.proc.returncode}")


@pytest.fixture(scope="session")
def comfy_page(comfy_server, say):
    """The ComfyUI page of `comfy_server` in Debian's headless chromium. Fails (never skips) when
    chromium is missing: scripts/setup_comfyui.sh installs it when run as root."""
    import comfy_browser

    missing = None
    try:
        comfy_browser.find_chromium()
    except comfy_browser.ChromiumMissing as e:
        missing = str(e)
    if missing:
        pytest.fail(missing, pytrace=False)
    t0 = time.time()
    page = comfy_browser.ComfyPage(comfy_server.url).open()
    say(f"ComfyUI page open in headless chromium ({comfy_browser.find_chromium()}) in {time.time() - t0:.1f} s")
    yield page
    page.close()


@pytest.fixture(scope="session")
def run_workflow_file(comfy_server, comfy_page):
    """Run a UI-format file of workflows/ through the real server: the frontend converts it to the API
    format (what its Run button posts), POST /prompt, /history. Returns (api prompt, history entry,
    [(node id, image record, PNG bytes)])."""

    def run(path: pathlib.Path | str, timeout: float = 600.0):
        path = pathlib.Path(path)
        if not path.is_absolute():
            path = WORKFLOWS_DIR / path
        workflow = json.loads(path.read_text())
        comfy_page.load_workflow(workflow, path.stem)
        converted = comfy_page.graph_to_prompt()
        entry = comfy_server.run_api_prompt(converted["output"], timeout=timeout, workflow=converted["workflow"])
        return converted["output"], entry, comfy_server.output_images(entry)

    return run
