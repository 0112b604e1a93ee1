#!/usr/bin/env bash
# How the shapes-world v2 models were trained on one lent GPU (H100), in resumable phases that
# each fit a 10-minute command. Run from the pack root with ComfyUI importable (MC_COMFYUI) and
# the pack's requirements installed. Every phase writes to $WORK; the shipped files are then
# copied into models/shapes_world by hand after checking them.
#
#   bash scripts/train_shapes_world_gpu.sh data            # pre-render 200k scenes on every core
#   bash scripts/train_shapes_world_gpu.sh encoders MIN    # VAE (two widths, the better kept) + dual encoder
#   bash scripts/train_shapes_world_gpu.sh unet MIN [--resume]   # UNet + jointly trained text tower
set -euo pipefail
WORK="${WORK:-/tmp/sw_v2}"
DATA="${DATA:-/dev/shm/shapes}"
PY="${PY:-python3}"
export PYTHONUNBUFFERED=1
phase="$1"; shift
case "$phase" in
  data)
    [ -f "$DATA/captions.json" ] || $PY -m training.make_dataset --n "${N_SCENES:-200000}" --workers "$(nproc)" --out "$DATA"
    ;;
  encoders)
    minutes="$1"
    mkdir -p "$WORK/vae32" "$WORK/vae64" "$WORK/clip"
    # ch 32: the v1 architecture, continued from the shipped v1 weights; ch 64: from scratch.
    cp models/shapes_world/vae.safetensors models/shapes_world/vae.json "$WORK/vae32/" 2>/dev/null || true
    $PY -m training.train_vae --dataset "$DATA" --out "$WORK/vae32" --resume --batch 64 --crop 128 --lr 2e-4 \
      --warmup 100 --lr-schedule cosine --minutes "$minutes" --log-every 200 --fp16 > "$WORK/vae32.log" 2>&1 &
    $PY -m training.train_vae --dataset "$DATA" --out "$WORK/vae64" --ch 64 --batch 64 --crop 128 --lr 3e-4 \
      --warmup 200 --lr-schedule cosine --minutes "$minutes" --log-every 200 --fp16 > "$WORK/vae64.log" 2>&1 &
    $PY -m training.train_clip --dataset "$DATA" --out "$WORK/clip" --batch 512 --lr 1e-3 --warmup 200 \
      --lr-schedule cosine --minutes "$minutes" --log-every 200 > "$WORK/clip.log" 2>&1 &
    wait
    tail -n 2 "$WORK"/vae32.log "$WORK"/vae64.log "$WORK"/clip.log
    # keep the VAE with the higher held-out PSNR
    best=$($PY -c "import json,sys; r={d: json.load(open(f'$WORK/{d}/vae.json'))['heldout_psnr_db'] for d in ('vae32','vae64')}; print(max(r, key=r.get)); print(r, file=sys.stderr)")
    mkdir -p "$WORK/final"
    cp "$WORK/$best"/vae* "$WORK/final/"
    cp "$WORK/clip"/clip* "$WORK/final/"
    echo "kept $best"
    ;;
  unet)
    minutes="$1"; shift
    $PY -m training.train_unet --dataset "$DATA" --models "$WORK/final" --out "$WORK/final" --train-text-encoder \
      --batch 256 --lr 3e-4 --warmup 500 --min-snr 5 --ema-decay 0.9995 --minutes "$minutes" --log-every 500 \
      --save-every-minutes 3 "$@"
    ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
