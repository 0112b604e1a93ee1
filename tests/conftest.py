"""Fixtures: the pack loaded by ComfyUI's own loader, tiny models, ComfyUI's executor and server.

`comfy_harness` (a `-p` plugin) has already set ComfyUI's arguments and sys.path.
"""
from __future__ import annotations

import asyncio
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import comfy_harness
import tiny_models

ARTIFACTS = pathlib.Path(os.environ.get("MC_TEST_ARTIFACTS", comfy_harness.PACK_DIR / "test-artifacts"))


@pytest.fixture(scope="session")
def artifacts() -> pathlib.Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def comfy_nodes():
    """ComfyUI's `nodes` module with its built-in extra nodes and the custom nodes of the base
    directory (only this pack) loaded by ComfyUI's own loader."""
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
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
    A failed run raises with ComfyUI's own error message."""
    import uuid

    import execution

    def run(prompt: dict) -> dict:
        valid = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))
        if not valid[0]:
            raise AssertionError(f"ComfyUI rejected the prompt: {valid[1]} {valid[3]}")
        executor.execute(prompt, str(uuid.uuid4()), {}, valid[2])
        if not executor.success:
            errors = [m for m in executor.status_messages if m[0] == "execution_error"]
            raise RuntimeError(errors[-1][1] if errors else executor.status_messages)
        return executor.history_result["outputs"]

    return run


# ---------------------------------------------------------------------------------------------
# The real server, started as a user would start it, on a free loopback port.

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base: pathlib.Path, log_path: pathlib.Path):
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc = None

    def start(self, timeout: float = 180.0):
        cmd = [sys.executable, str(comfy_harness.COMFY_DIR / "main.py"), "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--disable-auto-launch", "--disable-api-nodes",
               "--base-directory", str(self.base)]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=comfy_harness.COMFY_DIR, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; log: {self.log_path.read_text()[-3000:]}")
            try:
                self.get("/system_stats")
                return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer in {timeout} s; log: {self.log_path.read_text()[-3000:]}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.proc:
            self.log.close()

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST {path} -> {e.code}: {e.read().decode()[:3000]}") from None

    def run_api_prompt(self, prompt: dict, timeout: float = 600.0) -> dict:
        """POST /prompt, then poll /history until it finishes; returns the history entry."""
        prompt_id = self.post("/prompt", {"prompt": prompt})["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"]["status_str"] != "success":
                    raise AssertionError(f"workflow failed: {entry['status']['messages']}")
                return entry
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")


@pytest.fixture(scope="session")
def comfy_server(artifacts):
    base = comfy_harness.make_base_directory(pathlib.Path(comfy_harness.BASE_DIR.parent / (comfy_harness.BASE_DIR.name + "-server")))
    server = ComfyServer(base, artifacts / "comfyui-server.log").start()
    print(f"\nComfyUI server at {server.url} (pid {server.proc.pid}), log {server.log_path}")
    yield server
    server.stop()
