#!/usr/bin/env bash
# Install the jrs service (the `serve` extra: FastAPI + ONNX Runtime + OpenVINO, never torch) into
# a virtual environment, then check the result. The Dockerfiles RUN this script in their build stage;
# tests/deploy/test_install.py runs it into a throw-away venv.
#
# usage: docker/install.sh VENV [cpu|gpu] [SOURCE]
#   VENV     the virtual environment to create, e.g. /opt/venv
#   cpu|gpu  onnxruntime (CPU) or onnxruntime-gpu (CUDA execution provider); default cpu
#   SOURCE   the project root (pyproject.toml); default the parent folder of this script
# environment:
#   PYTHON       interpreter that creates the venv (default python3)
#   JRS_ORT_GPU  requirement installed in place of onnxruntime for gpu; it must match the CUDA
#                and cuDNN of the base image (default onnxruntime-gpu==1.31.1: CUDA 13, cuDNN 9)
#   PIP_*        pip's own settings (the Dockerfiles set PIP_NO_CACHE_DIR=1)
set -euo pipefail

venv=${1:?usage: install.sh VENV [cpu|gpu] [SOURCE]}
flavour=${2:-cpu}
src=${3:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
python=${PYTHON:-python3}
ort_gpu=${JRS_ORT_GPU:-onnxruntime-gpu==1.31.1}

case "$flavour" in
  cpu | gpu) ;;
  *) echo "install.sh: the flavour must be cpu or gpu, got '$flavour'" >&2; exit 2 ;;
esac
if [[ ! -f "$src/pyproject.toml" ]]; then
  echo "install.sh: no pyproject.toml in '$src' (pass the project root as SOURCE)" >&2
  exit 2
fi

"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
# A regular (non-editable) install: the venv holds everything and no longer needs the source.
"${pip[@]}" install "${src}[serve]"
if [[ "$flavour" == gpu ]]; then
  # onnxruntime and onnxruntime-gpu install the same `onnxruntime` package; with both present the
  # CUDA provider may be missing, so the CPU build goes before the GPU build comes in.
  "${pip[@]}" uninstall --yes onnxruntime
  "${pip[@]}" install "$ort_gpu"
fi
"${pip[@]}" check

"$venv/bin/python" - "$flavour" <<'PY'
import importlib.util
import sys

import onnxruntime
import openvino

import jrs_cli
import service.app

flavour = sys.argv[1]
if importlib.util.find_spec("torch") is not None:
    sys.exit("install.sh: torch is installed, but the service image must not contain it")
providers = onnxruntime.get_available_providers()
if flavour == "gpu" and "CUDAExecutionProvider" not in providers:
    sys.exit(f"install.sh: onnxruntime has no CUDAExecutionProvider (providers: {providers})")
# the CPU engine (JRS_ENGINE=auto on the CPU): OpenVINO must see the CPU
capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
print(
    f"install.sh: jrs ({flavour}) ready; onnxruntime {onnxruntime.__version__} {providers}; "
    f"openvino {openvino.__version__} CPU {list(capabilities)}"
)
PY
