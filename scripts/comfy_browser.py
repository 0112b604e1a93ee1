"""Drive the real ComfyUI frontend in Debian's headless chromium (Playwright's sync client).

The frontend is the one authority on ComfyUI's two workflow formats, so every conversion goes
through it rather than through a re-implementation:

  * UI -> API:  `await app.loadGraphData(workflow)`, then `(await app.graphToPrompt()).output`
                (exactly what the Run button posts to /prompt);
  * API -> UI:  `app.loadApiJson(api)`, a tidy left-to-right layout, `app.graph.serialize()`;
  * queueing as the Run button does: `await app.queuePrompt(0, 1)`.

Console messages and uncaught page errors are collected so callers can check that the pack's
extension raised nothing. Playwright's own browser download cannot work offline: this drives
`/usr/bin/chromium` (Debian's package; scripts/setup_comfyui.sh installs it when run as root).
"""
from __future__ import annotations

import os
import pathlib
import shutil
from dataclasses import dataclass

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
PACK_EXTENSION_URL = "/extensions/more-control/"  # where ComfyUI serves the pack's WEB_DIRECTORY


class ChromiumMissing(RuntimeError):
    pass


def find_chromium() -> str:
    """Debian's chromium, or $MC_CHROMIUM when set; a clear error when it is not there."""
    override = os.environ.get("MC_CHROMIUM")
    candidates = [override] if override else ["/usr/bin/chromium", shutil.which("chromium")]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise ChromiumMissing(
        f"no chromium at {override or '/usr/bin/chromium'}: the browser tests and the main job need Debian's "
        "chromium. Install it with `sudo bash scripts/setup_comfyui.sh` (or `sudo apt-get install -y chromium`), "
        "or point MC_CHROMIUM at a chromium binary.")


@dataclass
class ConsoleEntry:
    type: str      # 'error', 'warning', 'log', ... or 'pageerror' for an uncaught exception
    text: str
    url: str       # the script that logged it, when the browser knows

    def __str__(self) -> str:
        return f"[{self.type}] {self.text} ({self.url})" if self.url else f"[{self.type}] {self.text}"


# A tidy layout for a graph made by loadApiJson (its own `graph.arrange()` stacks every column at
# the top): columns by dependency depth with sources pulled right next to their first consumer,
# each column ordered to follow the inputs it feeds, widths and gaps from the real node sizes.
_TIDY_JS = r"""
() => {
  const graph = window.app.graph;
  const nodes = [...graph.nodes];
  const byId = new Map(nodes.map(n => [n.id, n]));
  const inputsOf = n => (n.inputs || []).map((inp, slot) => {
      if (inp.link == null) return null;
      const link = graph.links.get ? graph.links.get(inp.link) : graph.links[inp.link];
      return link ? {node: byId.get(link.origin_id), slot} : null;
    }).filter(x => x && x.node);
  const consumers = new Map(nodes.map(n => [n.id, []]));
  for (const n of nodes) for (const {node: src, slot} of inputsOf(n)) consumers.get(src.id).push({node: n, slot});
  // longest path from the sources
  const depth = new Map();
  const visit = (n, stack = new Set()) => {
    if (depth.has(n.id)) return depth.get(n.id);
    if (stack.has(n.id)) return 0;
    stack.add(n.id);
    let d = 0;
    for (const {node} of inputsOf(n)) d = Math.max(d, visit(node, stack) + 1);
    depth.set(n.id, d);
    return d;
  };
  nodes.forEach(n => visit(n));
  // pull every non-sink as far right as its consumers allow (e.g. EmptyLatentImage next to KSampler)
  const order = [...nodes].sort((a, b) => depth.get(b.id) - depth.get(a.id));
  for (const n of order) {
    const cs = consumers.get(n.id);
    if (cs.length) depth.set(n.id, Math.min(...cs.map(c => depth.get(c.node.id))) - 1);
  }
  const columns = [];
  for (const n of nodes) (columns[depth.get(n.id)] ||= []).push(n);
  const rank = new Map();
  // right to left: sinks by id, then each node after the node and input slot it feeds first
  for (let c = columns.length - 1; c >= 0; c--) {
    const col = columns[c] || [];
    const key = n => {
      const cs = consumers.get(n.id).filter(x => rank.has(x.node.id));
      if (!cs.length) return [1e9, +n.id || 0];
      return cs.map(x => [rank.get(x.node.id), x.slot]).sort((a, b) => a[0] - b[0] || a[1] - b[1])[0];
    };
    col.sort((a, b) => { const ka = key(a), kb = key(b); return ka[0] - kb[0] || ka[1] - kb[1] || a.id - b.id; });
    col.forEach((n, i) => rank.set(n.id, i));
  }
  // image outputs get room to show their image once the workflow ran
  for (const n of nodes)
    if (n.type === 'SaveImage' || n.type === 'PreviewImage') n.size = [Math.max(n.size[0], 320), Math.max(n.size[1], 360)];
  const GAP_X = 60, GAP_Y = 50, TITLE = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  let x = 40;
  for (const col of columns) {
    if (!col) continue;
    let y = 40 + TITLE;
    let width = 0;
    for (const n of col) {
      n.pos = [x, y];
      y += n.size[1] + TITLE + GAP_Y;
      width = Math.max(width, n.size[0]);
    }
    x += width + GAP_X;
  }
  graph.setDirtyCanvas(true, true);
  return columns.length;
}
"""

# Seeds and other widgets with 'control after generate' are set to 'fixed' so that a shared
# workflow gives the same image every time it is run.
_FIX_SEEDS_JS = r"""
() => {
  let changed = 0;
  for (const node of window.app.graph.nodes)
    for (const w of node.widgets || [])
      if (w.name === 'control_after_generate' && w.value !== 'fixed') { w.value = 'fixed'; changed++; }
  return changed;
}
"""


_FIT_VIEW_JS = r"""
(zoom) => {
  const c = window.app.canvas, nodes = window.app.graph.nodes;
  if (!nodes.length) return;
  const TITLE = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - TITLE);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  const W = c.canvas.width / window.devicePixelRatio, H = c.canvas.height / window.devicePixelRatio;
  const scale = Math.min(zoom * W / (x1 - x0), zoom * H / (y1 - y0), 1.0);
  c.ds.scale = scale;
  c.ds.offset[0] = W / scale / 2 - (x0 + x1) / 2;
  c.ds.offset[1] = H / scale / 2 - (y0 + y1) / 2;
  c.setDirty(true, true);
}
"""


class ComfyPage:
    """The ComfyUI page of a running server in headless chromium.

        with ComfyPage(server.url) as page:
            api = page.ui_to_api(workflow)
    """

    def __init__(self, url: str, viewport: tuple[int, int] = (1400, 900), timeout_s: float = 120.0):
        self.url = url.rstrip("/")
        self.viewport = viewport
        self.timeout_ms = int(timeout_s * 1000)
        self.console: list[ConsoleEntry] = []
        self._pw = self.browser = self.page = None

    # -- lifetime ---------------------------------------------------------------------------
    def open(self) -> "ComfyPage":
        executable = find_chromium()
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        try:
            self.browser = self._pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
            self.page = self.browser.new_page(viewport={"width": self.viewport[0], "height": self.viewport[1]})
            self.page.set_default_timeout(self.timeout_ms)
            # No "Nodes 2.0" banner over the canvas (the frontend keeps its dismissal in localStorage).
            self.page.add_init_script("try { localStorage.setItem('vueNodesBannerDismissed', 'true'); } catch {}")
            self.page.on("console", self._on_console)
            self.page.on("pageerror", lambda e: self.console.append(
                ConsoleEntry("pageerror", f"{e}\n{getattr(e, 'stack', '') or ''}", "")))
            self.page.goto(self.url + "/", wait_until="domcontentloaded")
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def wait_ready(self) -> None:
        """The app is set up: graph made, node definitions and extensions loaded, Vue app mounted."""
        self.page.wait_for_function(
            "() => window.app && window.app.graph && window.app.vueAppReady && window.app.canvas"
            " && window.LiteGraph && Object.keys(window.LiteGraph.registered_node_types).length > 0",
            timeout=self.timeout_ms)
        # The first workflow the app opens by itself (the default graph) loads asynchronously.
        self.page.wait_for_function("() => window.app.extensionManager?.workflow?.activeWorkflow != null",
                                    timeout=self.timeout_ms)

    def close(self) -> None:
        for closer in (self.browser, self._pw):
            if closer is not None:
                try:
                    closer.close() if closer is self.browser else closer.stop()
                except Exception:
                    pass
        self._pw = self.browser = self.page = None

    def __enter__(self) -> "ComfyPage":
        return self.open() if self.page is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    def _on_console(self, msg) -> None:
        location = msg.location or {}
        self.console.append(ConsoleEntry(msg.type, msg.text, location.get("url", "")))

    # -- console ----------------------------------------------------------------------------
    def errors(self) -> list[ConsoleEntry]:
        return [e for e in self.console if e.type in ("error", "pageerror")]

    def pack_errors(self, markers: tuple[str, ...] = (PACK_EXTENSION_URL, "more_control", "MoreControl",
                                                       "More Control", "[MC]")) -> list[ConsoleEntry]:
        """Errors that come from the pack: logged by one of its scripts, or naming it in text or stack."""
        return [e for e in self.errors() if any(m in e.url or m in e.text for m in markers)]

    # -- the app ----------------------------------------------------------------------------
    def evaluate(self, js: str, arg=None):
        return self.page.evaluate(js, arg)

    def extension_names(self) -> list[str]:
        return self.evaluate("() => (window.app.extensions || []).map(e => e.name)")

    def node_types(self) -> list[str]:
        return self.evaluate("() => Object.keys(window.LiteGraph.registered_node_types)")

    def load_workflow(self, workflow: dict, name: str | None = None) -> None:
        """Open a UI-format workflow as the Workflow > Open menu does."""
        self.evaluate("async ([wf, name]) => { await window.app.loadGraphData(wf, true, true, name); }",
                      [workflow, name])
        missing = self.evaluate("() => window.app.graph.nodes.filter(n => n.has_errors || "
                                "!window.LiteGraph.registered_node_types[n.type]).map(n => n.type)")
        if missing:
            raise RuntimeError(f"the frontend does not know these node types: {missing}")

    def set_widget(self, node: str, name: str, value) -> None:
        """Set a widget of the open graph (node by id or title) as a user's edit would."""
        error = self.evaluate("""([ref, name, value]) => {
            const nodes = window.app.graph.nodes.filter(n => String(n.id) === ref || n.title === ref);
            if (nodes.length !== 1) return `${nodes.length} nodes have the id or title ${JSON.stringify(ref)}`;
            const w = (nodes[0].widgets || []).find(w => w.name === name);
            if (!w) return `node ${ref} (${nodes[0].type}) has no widget ${JSON.stringify(name)}; it has: ` +
                           (nodes[0].widgets || []).map(w => w.name).join(', ');
            w.value = value; w.callback?.(value);
            return null;
        }""", [str(node), name, value])
        if error:
            raise ValueError(error)

    def graph_to_prompt(self) -> dict:
        """{'output': API prompt, 'workflow': UI workflow} of the open graph, as the Run button builds it."""
        return self.evaluate("async () => { const p = await window.app.graphToPrompt();"
                             " return JSON.parse(JSON.stringify({output: p.output, workflow: p.workflow})); }")

    def ui_to_api(self, workflow: dict) -> dict:
        """A UI-format workflow in the API format (what POST /prompt takes)."""
        self.load_workflow(workflow)
        return self.graph_to_prompt()["output"]

    def api_to_ui(self, api: dict, name: str = "workflow", tidy: bool = True, fix_seeds: bool = True) -> dict:
        """An API-format prompt as a UI-format workflow, laid out left to right."""
        missing = self.evaluate("(api) => Object.values(api).map(n => n.class_type)"
                                ".filter(t => !window.LiteGraph.registered_node_types[t])", api)
        if missing:
            raise RuntimeError(f"the frontend does not know these node types: {sorted(set(missing))}")
        self.evaluate("([api, name]) => window.app.loadApiJson(api, name)", [api, name])
        if fix_seeds:
            self.evaluate(_FIX_SEEDS_JS)
        if tidy:
            self.evaluate(_TIDY_JS)
        self.fit_view()
        return self.serialize()

    def serialize(self) -> dict:
        """The open graph in the UI format, as ComfyUI saves it (JSON.stringify drops undefined fields)."""
        return self.evaluate("() => JSON.parse(JSON.stringify(window.app.graph.serialize()))")

    def fit_view(self, zoom: float = 0.9) -> None:
        """Zoom and pan the canvas so the whole graph is in view (stored in the workflow's extra.ds)."""
        self.evaluate(_FIT_VIEW_JS, zoom)

    def queue(self) -> str:
        """Queue the open graph as the Run button does (`app.queuePrompt(0, 1)`); returns the prompt id."""
        with self.page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as info:
            self.evaluate("async () => await window.app.queuePrompt(0, 1)")
        response = info.value
        body = response.json()
        if response.status != 200 or body.get("node_errors"):
            raise RuntimeError(f"the frontend could not queue the workflow: {response.status} {body}")
        return body["prompt_id"]

    def screenshot(self, path: str | os.PathLike, canvas_only: bool = False) -> pathlib.Path:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Full detail at any zoom for this page only (the LOD setting itself is left as it is).
        self.evaluate("() => { window.app.canvas.min_font_size_for_lod = 0; window.app.canvas.setDirty(true, true); }")
        self.page.wait_for_timeout(300)  # one animation frame or two for the canvas to redraw
        target = self.page.locator("canvas#graph-canvas") if canvas_only else self.page
        target.screenshot(path=str(path), type="jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "png")
        return path
