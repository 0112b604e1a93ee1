import json
import pathlib

import comfy_harness


def test_comfyui_version():
    import comfyui_version
    assert comfyui_version.__version__ == "0.3.75"


def test_pack_loaded_by_comfyui(pack, comfy_nodes):
    import nodes
    assert str(comfy_harness.PACK_DIR) == str(pathlib.Path(pack.__file__).resolve().parent)
    print("registered:", sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("MC_")))
