"""The pack's node list. Each technique module exports `NODES`, the V3 node classes it adds.

Layout: `nodes/<technique>.py` holds the thin node classes (inputs, validation, a call,
outputs); `nodes/algorithms/` holds plain-torch code that knows nothing of ComfyUI;
the `nodes/glue/` package is the one place that touches ComfyUI internals (patching, guiders,
samplers, model access, inference mode; its `__init__.py` lists its modules);
`nodes/shapes_world/` holds the demo world, its detector and the demo models' build/load code.
"""
from __future__ import annotations

import importlib
import logging

from typing_extensions import override

from comfy_api.v0_0_2 import ComfyExtension, io

# One module per technique. A module that fails to import (a missing optional dependency)
# is logged and skipped, so one broken technique does not take the whole pack down.
TECHNIQUE_MODULES = [
    "segfree",
    "clip_models",
    "blended",
    "shapes_world_loader",
    "sdg",
    "composition",
]


def load_node_classes() -> list[type[io.ComfyNode]]:
    classes: list[type[io.ComfyNode]] = []
    for name in TECHNIQUE_MODULES:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except Exception:
            logging.exception("[More Control] could not load the %s nodes", name)
            continue
        classes.extend(module.NODES)
    return classes


class MoreControlExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return load_node_classes()
