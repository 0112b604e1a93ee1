#!/usr/bin/env python3
"""The main job, headless: run one of the pack's workflows in a real ComfyUI and save its images.

    python3 scripts/run_workflow.py [WORKFLOW] [--out outputs/]

WORKFLOW is a UI-format workflow file (as saved by ComfyUI) or the name of one in workflows/
(`shapes_world_txt2img` = workflows/shapes_world_txt2img.json); without it the default workflow runs.
An API-format file (ComfyUI's "Export (API)", workflows/src/*.api.json) is queued as it is.

What it does:
  1. makes sure ComfyUI 0.3.75 is installed (scripts/setup_comfyui.sh: idempotent, a no-op once done)
     and re-runs itself with that installation's Python;
  2. starts the ComfyUI server (CPU unless --gpu) on a free loopback port, with this pack in
     `custom_nodes` of a base directory under the cache;
  3. opens the ComfyUI page in headless chromium and lets the real frontend turn the UI-format
     workflow into the API format (`app.graphToPrompt()`, what the Run button sends);
  4. queues it (POST /prompt with the Run button's body) and shows progress from the /ws websocket;
  5. writes the output images into --out and stops the server by its PID.

Models: the server sees the `models/` folder of the ComfyUI it runs (--comfyui / $MC_COMFYUI, default
the cached install) and that ComfyUI's own `extra_model_paths.yaml`; --extra-model-paths-config adds
more. The default workflow needs none: it runs the pack's shapes-world models, which fall back to
clearly labelled seeded random weights when the trained ones are not there.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
import uuid

SCRIPTS = pathlib.Path(__file__).resolve().parent
PACK_DIR = SCRIPTS.parent
WORKFLOWS = PACK_DIR / "workflows"
DEFAULT_WORKFLOWS = ("shapes_world_txt2img", "core_smoke")  # the first that exists is the default
CACHE = pathlib.Path(os.environ.get("MC_CACHE", pathlib.Path.home() / ".cache" / "more-control"))


def log(msg: str) -> None:
    print(f"[run_workflow] {msg}", flush=True)


def default_workflow() -> pathlib.Path:
    for name in DEFAULT_WORKFLOWS:
        path = WORKFLOWS / f"{name}.json"
        if path.exists():
            return path
    raise SystemExit(f"no default workflow in {WORKFLOWS} (looked for {', '.join(DEFAULT_WORKFLOWS)})")


def resolve_workflow(arg: str | None) -> pathlib.Path:
    if arg is None:
        return default_workflow()
    for path in (pathlib.Path(arg), WORKFLOWS / arg, WORKFLOWS / f"{arg}.json"):
        if path.is_file():
            return path.resolve()
    names = ", ".join(sorted(p.stem for p in WORKFLOWS.glob("*.json")))
    raise SystemExit(f"no workflow {arg!r}: give a .json file or one of: {names}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflow", nargs="?", help="UI-format workflow file, or a name in workflows/ "
                                                f"(default: {' or '.join(DEFAULT_WORKFLOWS)})")
    ap.add_argument("--out", default="outputs", help="folder for the output images (default: outputs/)")
    ap.add_argument("--comfyui", default=os.environ.get("MC_COMFYUI"),
                    help="a ComfyUI folder to run (default: $MC_COMFYUI, else the one scripts/setup_comfyui.sh "
                         "installs under the cache); its models/ and extra_model_paths.yaml are used")
    ap.add_argument("--python", default=os.environ.get("MC_PYTHON"),
                    help="the Python that runs the ComfyUI server (default: $MC_PYTHON, else the cache's venv)")
    ap.add_argument("--extra-model-paths-config", action="append", default=[], metavar="YAML",
                    help="more model folders, in ComfyUI's extra_model_paths.yaml format (repeatable)")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.WIDGET=VALUE",
                    help="change a widget before running, NODE being the node's id or title "
                         "(e.g. --set Prompt.text='a blue circle' --set 5.seed=7); repeatable")
    ap.add_argument("--list", action="store_true", help="list the workflows in workflows/ and exit")
    ap.add_argument("--gpu", action="store_true", help="let ComfyUI use the GPU (default: --cpu)")
    ap.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the workflow (default 1800)")
    ap.add_argument("--no-setup", action="store_true", help="do not run scripts/setup_comfyui.sh")
    return ap.parse_args(argv)


def parse_set(item: str) -> tuple[str, str, object]:
    """'NODE.WIDGET=VALUE' -> (node, widget, value); VALUE is JSON when it parses, else a string."""
    target, sep, raw = item.partition("=")
    node, dot, widget = target.rpartition(".")
    if not sep or not dot or not node or not widget:
        raise SystemExit(f"--set {item!r}: expected NODE.WIDGET=VALUE")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return node, widget, value


def list_workflows() -> None:
    default = default_workflow()
    for path in sorted(WORKFLOWS.glob("*.json")):
        nodes = json.loads(path.read_text()).get("nodes", [])
        pack = sorted({n["type"] for n in nodes if n["type"].startswith("MC_")})
        print(f"{path.stem:32s}{' (default)' if path == default else '':10s} {len(nodes):3d} nodes  {' '.join(pack)}")


def bootstrap(args: argparse.Namespace) -> None:
    """Install ComfyUI if needed and re-run this script with the Python that has its packages."""
    if os.environ.get("MC_RUN_WORKFLOW_BOOTSTRAPPED") == "1":
        return
    venv_python = CACHE / "venv" / "bin" / "python"
    if not args.no_setup and args.comfyui is None:
        log("checking the ComfyUI installation (scripts/setup_comfyui.sh)")
        subprocess.run(["bash", str(SCRIPTS / "setup_comfyui.sh")], check=True)
    try:
        import playwright  # noqa: F401
        import websocket  # noqa: F401
        have_tools = True
    except ImportError:
        have_tools = False
    in_venv = pathlib.Path(sys.prefix).resolve() == (CACHE / "venv").resolve()
    if not in_venv and venv_python.exists() and (args.comfyui is None or not have_tools):
        os.environ["MC_RUN_WORKFLOW_BOOTSTRAPPED"] = "1"
        os.execv(str(venv_python), [str(venv_python), str(pathlib.Path(__file__).resolve()), *sys.argv[1:]])
    if not have_tools:
        raise SystemExit("this Python lacks playwright and websocket-client: "
                         "pip install -r requirements-dev.txt, or run scripts/setup_comfyui.sh")


class Progress:
    """Prints what the server reports on /ws for one prompt: nodes as they start, sampler steps."""

    def __init__(self, prompt: dict):
        self.names = {nid: (n.get("_meta", {}).get("title") or n["class_type"]) for nid, n in prompt.items()}
        self.tty = sys.stdout.isatty()
        self.last_line = ""
        self.started = time.time()

    def _print(self, line: str, transient: bool = False) -> None:
        if self.tty:
            sys.stdout.write("\r\033[K" + line + ("" if transient else "\n"))
            sys.stdout.flush()
        elif not transient or line != self.last_line:
            print(line, flush=True)
        self.last_line = line

    def handle(self, kind: str, data: dict) -> None:
        t = f"{time.time() - self.started:6.1f}s"
        if kind == "execution_start":
            self._print(f"[run_workflow] {t} started")
        elif kind == "execution_cached" and data.get("nodes"):
            self._print(f"[run_workflow] {t} cached: {', '.join(self.names.get(n, n) for n in data['nodes'])}")
        elif kind == "executing" and data.get("node") is not None:
            node = data["node"]
            self._print(f"[run_workflow] {t} running #{node} {self.names.get(node, '')}")
        elif kind == "progress":
            value, maximum = data.get("value", 0), data.get("max", 0) or 1
            bar = "#" * int(20 * value / maximum)
            node = data.get("node")
            self._print(f"[run_workflow] {t}   #{node} {self.names.get(node, '')} [{bar:<20}] {value}/{maximum}",
                        transient=value < maximum)
        elif kind == "execution_success":
            self._print(f"[run_workflow] {t} finished")
        elif kind == "execution_error":
            self._print(f"[run_workflow] {t} FAILED in #{data.get('node_id')} {data.get('node_type')}: "
                        f"{data.get('exception_type')}: {data.get('exception_message')}")
        elif kind == "execution_interrupted":
            self._print(f"[run_workflow] {t} interrupted")


def follow(server, ws, prompt_id: str, progress: Progress, timeout: float) -> None:
    """Read /ws messages for `prompt_id` until it succeeded, failed or was interrupted."""
    import websocket

    deadline = time.time() + timeout
    finished_at = None  # when /history said it is done (its messages may still be in flight)
    while time.time() < deadline:
        try:
            raw = ws.recv()
        except websocket.WebSocketTimeoutException:
            if finished_at is not None:
                return
            if server.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {server.proc.returncode}; log:\n{server.log_tail()}")
            # The history is the record: the websocket may have missed the end (the worker thread
            # writes the history before the server's event loop has sent the last messages).
            entry = server.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                finished_at = time.time()
            continue
        except (websocket.WebSocketConnectionClosedException, OSError):
            server.wait_history(prompt_id, timeout=max(1.0, deadline - time.time()), check=False)
            return
        if not isinstance(raw, str):
            continue  # binary frames: latent previews
        msg = json.loads(raw)
        data = msg.get("data") or {}
        if os.environ.get("MC_DEBUG_WS"):
            print("ws:", raw[:300], flush=True)
        if data.get("prompt_id") not in (None, prompt_id):
            continue
        progress.handle(msg.get("type", ""), data)
        if msg.get("type") in ("execution_success", "execution_error", "execution_interrupted"):
            return
    raise TimeoutError(f"the workflow did not finish in {timeout} s")


def run(args: argparse.Namespace) -> list[pathlib.Path]:
    sys.path.insert(0, str(SCRIPTS))
    import websocket

    from comfy_browser import ComfyPage
    from comfy_server import ComfyServer, format_status_messages, make_base_directory

    workflow_path = resolve_workflow(args.workflow)
    edits = [parse_set(item) for item in args.set]
    workflow = json.loads(workflow_path.read_text())
    api_format = "nodes" not in workflow
    if api_format and not all(isinstance(n, dict) and "class_type" in n for n in workflow.values()):
        raise SystemExit(f"{workflow_path} is neither a UI-format workflow nor an API-format prompt")
    comfy_dir = pathlib.Path(args.comfyui or CACHE / "ComfyUI").resolve()
    python = args.python or (CACHE / "venv" / "bin" / "python")
    out_dir = pathlib.Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    base = make_base_directory(CACHE / "run-base", models_from=comfy_dir)
    extra = [a for path in args.extra_model_paths_config for a in ("--extra-model-paths-config",
                                                                    str(pathlib.Path(path).resolve()))]
    server = ComfyServer(base, base / "comfyui.log", comfy_dir=comfy_dir, python=python, port=args.port or None,
                         cpu=not args.gpu, extra_args=extra)
    log(f"workflow {workflow_path}")
    t0 = time.time()
    server.start()
    try:
        log(f"ComfyUI {server.url} (pid {server.pid}, {'GPU' if args.gpu else 'CPU'}) started in "
            f"{time.time() - t0:.1f} s; log {server.log_path}")
        t1 = time.time()
        if api_format:  # already what /prompt takes (e.g. workflows/src/*.api.json): no browser needed
            converted = {"output": workflow, "workflow": None}
            for node, widget, value in edits:
                matches = [k for k, n in workflow.items() if node in (k, n.get("_meta", {}).get("title"))]
                if len(matches) != 1 or widget not in workflow[matches[0]]["inputs"]:
                    raise ValueError(f"--set {node}.{widget}: no such node input in the API prompt")
                workflow[matches[0]]["inputs"][widget] = value
                log(f"set {node}.{widget} = {value!r}")
            log(f"API-format prompt of {len(workflow)} nodes: queued as it is")
        else:
            with ComfyPage(server.url) as page:
                page.load_workflow(workflow, workflow_path.stem)
                for node, widget, value in edits:
                    page.set_widget(node, widget, value)
                    log(f"set {node}.{widget} = {value!r}")
                converted = page.graph_to_prompt()
                errors = page.pack_errors()
            for e in errors:
                log(f"browser console: {e}")
            log(f"the frontend converted {len(workflow['nodes'])} nodes to an API prompt of "
                f"{len(converted['output'])} in {time.time() - t1:.1f} s")
        prompt = converted["output"]

        client_id = uuid.uuid4().hex
        ws = websocket.WebSocket()
        ws.connect(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}", timeout=10)
        ws.settimeout(2.0)
        try:
            prompt_id = server.queue_prompt(prompt, client_id=client_id, workflow=converted["workflow"])
            log(f"queued prompt {prompt_id}")
            follow(server, ws, prompt_id, Progress(prompt), args.timeout)
        finally:
            ws.close()
        entry = server.wait_history(prompt_id, timeout=60, check=False)
        log(f"status: {entry['status']['status_str']}")
        if entry["status"]["status_str"] != "success":
            raise RuntimeError(f"the workflow failed: {format_status_messages(entry['status']['messages'])}")
        written = []
        for node_id, image, data in server.output_images(entry):
            target = out_dir / image["filename"]
            target.write_bytes(data)
            written.append(target)
        if not written:
            log("the workflow finished but saved no images (it has no SaveImage node?)")
        for path in written:
            log(f"wrote {path}")
        log(f"done in {time.time() - t0:.1f} s")
        return written
    finally:
        server.stop()
        log(f"stopped ComfyUI (pid {server.pid})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        list_workflows()
        return 0
    bootstrap(args)
    try:
        run(args)
    except (RuntimeError, TimeoutError, AssertionError, ValueError) as e:
        log(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
