#!/usr/bin/env bash
# The test command (README): installs ComfyUI 0.3.75 and the test tools if needed (cached),
# then runs the whole suite inside that real ComfyUI. Extra arguments go to pytest.
set -euo pipefail
PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${MC_CACHE:-$HOME/.cache/more-control}"
bash "$PACK_DIR/scripts/setup_comfyui.sh"
cd "$PACK_DIR"
exec "$CACHE/venv/bin/python" -m pytest "$@"
