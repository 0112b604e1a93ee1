"""The pack as ComfyUI sees it: loaded by ComfyUI's own loader, every node registered, typed,
documented, and the project files a registry needs."""
import pathlib
import tomllib

import pytest

import comfy_harness

PACK = comfy_harness.PACK_DIR


def test_comfyui_version():
    import comfyui_version

    assert comfyui_version.__version__ == "0.3.75"


@pytest.fixture(scope="module")
def declared(pack_module):
    return pack_module("nodes").load_node_classes()


def test_pack_loaded_by_comfyui_and_every_node_registered(pack, comfy_nodes, declared):
    import nodes

    assert pathlib.Path(pack.__file__).resolve().parent == PACK
    assert nodes.LOADED_MODULE_DIRS.get(comfy_harness.PACK_LINK_NAME), "ComfyUI's loader did not record the pack"
    ids = [cls.GET_SCHEMA().node_id for cls in declared]
    assert len(ids) == len(set(ids))
    registered = sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("MC_"))
    assert registered == sorted(ids)
    # A technique module that failed to import would be missing here: the list is written out.
    for module in pack.nodes.TECHNIQUE_MODULES:
        assert any(cls.__module__.endswith(f".nodes.{module}") for cls in declared), f"nodes/{module}.py registered nothing"
    print(f"\nMore Control: {len(registered)} nodes registered by ComfyUI's loader: {', '.join(registered)}")


def test_every_node_is_prefixed_documented_and_has_tooltips(declared):
    for cls in declared:
        schema = cls.GET_SCHEMA()
        assert schema.node_id.startswith("MC_")
        assert schema.display_name and schema.description and schema.category.startswith("More Control")
        for item in schema.inputs:
            assert item.tooltip, f"{schema.node_id}: input '{item.id}' has no tooltip"
        assert (PACK / "web" / "docs" / f"{schema.node_id}.md").is_file(), f"no help page for {schema.node_id}"


def test_project_files():
    meta = tomllib.loads((PACK / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "more-control"
    assert meta["tool"]["comfy"]["DisplayName"] == "More Control"
    assert "requires-comfyui" in meta["tool"]["comfy"]
    assert "GNU GENERAL PUBLIC LICENSE" in (PACK / "LICENSE").read_text()[:200]
    requirements = [line.split(">")[0].split("=")[0].split("<")[0].strip().lower()
                    for line in (PACK / "requirements.txt").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert "torch" not in requirements and "torchvision" not in requirements
    assert all("==" not in line for line in (PACK / "requirements.txt").read_text().splitlines()), "loose bounds only"
    for workflow in (PACK / "workflows").glob("*.json"):
        assert workflow.with_suffix(".jpg").is_file(), f"{workflow.name} has no thumbnail"
