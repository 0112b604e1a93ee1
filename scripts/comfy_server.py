"""Start and stop a real ComfyUI server with this pack installed (standard library only).

Used by scripts/run_workflow.py, scripts/build_workflows.py and the tests' `comfy_server` fixture.
The server is the stock `main.py`, run as a user runs it, on a free loopback port, with a base
directory whose `custom_nodes/more-control` links to this checkout. It is stopped by its PID.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

PACK_DIR = pathlib.Path(__file__).resolve().parents[1]
PACK_LINK_NAME = "more-control"
CACHE = pathlib.Path(os.environ.get("MC_CACHE", pathlib.Path.home() / ".cache" / "more-control"))
DEFAULT_COMFY_DIR = pathlib.Path(os.environ.get("MC_COMFYUI", CACHE / "ComfyUI"))
DEFAULT_PYTHON = pathlib.Path(os.environ.get("MC_PYTHON", CACHE / "venv" / "bin" / "python"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_base_directory(base: pathlib.Path, models_from: pathlib.Path | None = None) -> pathlib.Path:
    """A ComfyUI base directory with only this pack in `custom_nodes`.

    `models_from`: a ComfyUI folder whose `models/` the server should see (a user's own install);
    `base/models` then links to it. ComfyUI also reads `extra_model_paths.yaml` next to its `main.py`
    by itself, so a user's extra model paths are respected too.
    """
    for sub in ("custom_nodes", "input", "output", "temp", "user/default"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    models = base / "models"
    if models_from is not None and (models_from / "models").is_dir():
        if models.is_symlink() or not models.exists():
            if models.is_symlink():
                models.unlink()
            models.symlink_to((models_from / "models").resolve(), target_is_directory=True)
    models.mkdir(exist_ok=True)
    link = base / "custom_nodes" / PACK_LINK_NAME
    if link.is_symlink() and link.resolve() != PACK_DIR:
        link.unlink()
    if not link.exists():
        link.symlink_to(PACK_DIR, target_is_directory=True)
    settings = base / "user" / "default" / "comfy.settings.json"
    data = json.loads(settings.read_text()) if settings.exists() else {}
    data["Comfy.TutorialCompleted"] = True  # no first-run templates dialog over the canvas
    settings.write_text(json.dumps(data, indent=2))
    return base


class ComfyServer:
    """`python main.py --cpu --listen 127.0.0.1 --port PORT --base-directory BASE` as a subprocess."""

    def __init__(self, base: pathlib.Path, log_path: pathlib.Path, comfy_dir: pathlib.Path = DEFAULT_COMFY_DIR,
                 python: pathlib.Path | str = DEFAULT_PYTHON, port: int | None = None, cpu: bool = True,
                 extra_args: list[str] | tuple[str, ...] = ()):
        self.base = pathlib.Path(base)
        self.comfy_dir = pathlib.Path(comfy_dir)
        self.python = str(python)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = pathlib.Path(log_path)
        self.cpu = cpu
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen | None = None
        self.log = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        cmd = [self.python, str(self.comfy_dir / "main.py"), "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--disable-api-nodes", "--base-directory", str(self.base),
               # ComfyUI's default database lives in its own tree (user/comfyui.db); keep it in the base dir.
               "--database-url", f"sqlite:///{self.base.resolve() / 'user' / 'comfyui.db'}"]
        if self.cpu:
            cmd.append("--cpu")
        return cmd + self.extra_args

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        if not (self.comfy_dir / "main.py").exists():
            raise FileNotFoundError(f"no ComfyUI at {self.comfy_dir}: run scripts/setup_comfyui.sh first")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command(), cwd=self.comfy_dir, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; log {self.log_path}:\n"
                                   f"{self.log_tail()}")
            try:
                self.get("/system_stats")
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer in {timeout} s; log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM to the server's PID, SIGKILL if it has not gone in 20 s."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.log is not None and not self.log.closed:
            self.log.close()

    def __enter__(self) -> "ComfyServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- HTTP -------------------------------------------------------------------------------
    def get_bytes(self, path: str, timeout: float = 30) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return r.read()

    def get(self, path: str):
        return json.loads(self.get_bytes(path))

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST {path} -> {e.code}: {e.read().decode()[:3000]}") from None

    def queue_prompt(self, prompt: dict, client_id: str | None = None, workflow: dict | None = None) -> str:
        """POST /prompt with the body the frontend's Run button sends; returns the prompt id."""
        body: dict = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        if workflow is not None:
            body["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        return self.post("/prompt", body)["prompt_id"]

    def wait_history(self, prompt_id: str, timeout: float = 600.0, check: bool = True) -> dict:
        """Poll /history/<id> until the prompt finished; a failed run raises with ComfyUI's messages."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if check and entry["status"]["status_str"] != "success":
                    raise AssertionError(f"workflow failed: {format_status_messages(entry['status']['messages'])}")
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")

    def run_api_prompt(self, prompt: dict, timeout: float = 600.0, workflow: dict | None = None) -> dict:
        """POST /prompt, then poll /history until it finishes; returns the history entry."""
        return self.wait_history(self.queue_prompt(prompt, workflow=workflow), timeout)

    def output_images(self, entry: dict) -> list[tuple[str, dict, bytes]]:
        """(node id, image record, file bytes) for every image of type 'output' in a history entry,
        fetched through /view as the frontend does."""
        images = []
        for node_id, out in entry.get("outputs", {}).items():
            for image in out.get("images", []):
                if image.get("type") != "output":
                    continue
                query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
                images.append((node_id, image, self.get_bytes(f"/view?{query}")))
        return images


def format_status_messages(messages: list) -> str:
    """ComfyUI's execution_error message, readable: node, type, exception and the traceback's end."""
    for kind, data in messages:
        if kind == "execution_error":
            trace = "".join(data.get("traceback", [])[-3:])
            return (f"node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_type')}: "
                    f"{data.get('exception_message')}\n{trace}")
    return json.dumps(messages)[:3000]
