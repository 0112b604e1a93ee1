"""The map stays true: every file, folder or module of the pack that README.md names exists.

Paths are found anywhere in the README (in backticks, in links, in plain text and in code blocks):
  * words starting with one of the pack's top-level folders (`nodes/glue/attention.py`, `tests/...`);
  * words in backticks that end with a file extension (`__init__.py`, `requirements.txt`): a bare
    file name must exist somewhere in the pack;
  * dotted modules run with `python -m` (`training.train_unet` -> training/train_unet.py);
  * relative link targets (`[results](docs/results.md)`).
Globs (`tests/test_blended*.py`) and placeholders (`nodes/<technique>.py`) must match at least one
file; `workflows/NAME` may name `workflows/NAME.json`. What is not the pack's own tree (ComfyUI's
`comfy/...`, the user's home or ComfyUI folders, what a command creates) is in ALLOWED.
Pure text, no ComfyUI: the check costs milliseconds.
"""
from __future__ import annotations

import pathlib
import re

PACK = pathlib.Path(__file__).resolve().parents[1]
README = PACK / "README.md"

TOP_LEVEL = ("nodes", "tests", "benchmarks", "training", "scripts", "workflows", "web", "docs", "models", ".ci")
EXTENSIONS = ("py", "md", "json", "png", "jpg", "txt", "sh", "safetensors", "toml", "ini", "log", "js", "yaml")

# Names that are not paths of this pack: ComfyUI's own tree, the user's folders, run outputs.
ALLOWED_PREFIXES = (
    "comfy/", "comfy_extras/", "comfy_api/",   # ComfyUI's source tree
    "~/", "$", "/",                            # the user's home, environment variables, absolute paths
    "ComfyUI/", "more-control/",               # a user's ComfyUI install and the clone's folder in it
    "models/more_control_clip/",               # a folder of the user's ComfyUI models directory
    "outputs/",                                # written by scripts/run_workflow.py
)

_PATH_WORD = re.compile(r"(?<![\w./-])((?:%s)/[\w./*<>{}-]*)" % "|".join(re.escape(t) for t in TOP_LEVEL))
_BACKTICK = re.compile(r"`([^`\n]+)`")
_FILE_WORD = re.compile(r"^[\w.*<>-]+\.(?:%s)$" % "|".join(EXTENSIONS))
_MODULE = re.compile(r"python3? -m ((?:%s)(?:\.\w+)+)" % "|".join(t for t in TOP_LEVEL if not t.startswith(".")))
_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def named_paths(text: str) -> set[str]:
    """Every pack path the text names (see the module docstring)."""
    names = {m.rstrip(".,;:") for m in _PATH_WORD.findall(text)}
    for span in _BACKTICK.findall(text):
        for word in span.split():
            word = word.strip("()[],;:")
            if _FILE_WORD.match(word):
                names.add(word)
    for module in _MODULE.findall(text):
        names.add(module.replace(".", "/") + ".py")
    for target in _LINK.findall(text):
        if "://" not in target and not target.startswith("mailto:"):
            names.add(target)
    return {n for n in names if n and not n.startswith(ALLOWED_PREFIXES)}


def exists(name: str, root: pathlib.Path = PACK) -> bool:
    pattern = re.sub(r"<[^>]*>|\{[^}]*\}", "*", name).rstrip("/")
    if "/" not in pattern:  # a bare file name: somewhere in the pack
        return any(p for p in root.rglob(pattern) if ".git" not in p.parts)
    if "*" in pattern:
        return any(root.glob(pattern))
    path = root / pattern
    return path.exists() or (pattern.startswith("workflows/") and path.with_suffix(".json").exists())


def missing_paths(text: str, root: pathlib.Path = PACK) -> list[str]:
    return sorted(n for n in named_paths(text) if not exists(n, root))


def test_every_path_the_readme_names_exists():
    text = README.read_text()
    names = named_paths(text)
    # the check finds the README's map at all (a broken pattern would find nothing and pass)
    assert {"nodes/glue/", "nodes/glue/attention.py", "benchmarks/shapes_report.py", "docs/results.md"} <= names, names
    missing = missing_paths(text)
    assert not missing, f"README.md names files that do not exist: {missing}"


def test_the_readme_no_longer_describes_glue_as_one_module():
    assert "nodes/glue.py" not in README.read_text()
    assert not (PACK / "nodes" / "glue.py").exists() and (PACK / "nodes" / "glue" / "__init__.py").is_file()


def test_the_check_catches_a_stale_name():
    """The same check on a made-up README finds exactly the stale names."""
    text = ("Glue lives in `nodes/glue.py` and `nodes/glue/attention.py`; run `python -m training.train_gone` or\n"
            "`python -m training.train_unet`; see [results](docs/results.md), [old](docs/old_results.md),\n"
            "tests/test_blended*.py, tests/test_nothing*.py, `nodes/<technique>.py`, `not_a_file_anywhere.py`,\n"
            "`workflows/blended_full_edit`, `comfy/supported_models.py`, `~/.cache/more-control`.\n"
            "```\npython benchmarks/no_such_bench.py --out models/shapes_world\n```\n")
    assert missing_paths(text) == ["benchmarks/no_such_bench.py", "docs/old_results.md", "nodes/glue.py",
                                   "not_a_file_anywhere.py", "tests/test_nothing*.py", "training/train_gone.py"]


def table_names(marker: str, text: str | None = None) -> list[str]:
    """The first-column names of the README table between `<!-- marker:start -->` and `:end`."""
    text = README.read_text() if text is None else text
    body = text.split(f"<!-- {marker}:start -->", 1)[1].split(f"<!-- {marker}:end -->", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", body, flags=re.M)


def test_the_nodes_table_lists_every_node():
    """Every node (test_foundation checks each registered node has a help page) has a row, and every
    row is a node that exists."""
    nodes = {p.stem for p in (PACK / "web" / "docs").glob("MC_*.md")}
    rows = table_names("nodes-table")
    assert len(rows) == len(set(rows)), "a node is listed twice"
    assert sorted(nodes - set(rows)) == [], "nodes missing from the README's nodes table"
    assert sorted(set(rows) - nodes) == [], "the README's nodes table lists nodes that do not exist"


def test_the_workflows_table_lists_every_workflow():
    workflows = {p.stem for p in (PACK / "workflows").glob("*.json")}
    rows = table_names("workflows-table")
    assert len(rows) == len(set(rows)), "a workflow is listed twice"
    assert sorted(workflows - set(rows)) == [], "workflows missing from the README's workflows table"
    assert sorted(set(rows) - workflows) == [], "the README's workflows table lists workflows that do not exist"


def test_the_table_reader_sees_a_missing_row():
    text = "<!-- t:start -->\n| node | what |\n|---|---|\n| `MC_A` | a |\n| `MC_B` | b |\n<!-- t:end -->\n| `MC_C` | c |\n"
    assert table_names("t", text) == ["MC_A", "MC_B"]
