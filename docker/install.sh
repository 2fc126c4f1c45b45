#!/usr/bin/env bash
# Install the jrs service (the `serve` extra: FastAPI + ONNX Runtime + OpenVINO, never torch) into
# a virtual environment, then check the result. The Dockerfiles RUN this script in their build stage;
# tests/deploy/test_install.py runs it into a throw-away venv.
#
# usage: docker/install.sh VENV [cpu|gpu|adapt-cpu] [SOURCE]
#   VENV       the virtual environment to create, e.g. /opt/venv
#   cpu|gpu    onnxruntime (CPU) or onnxruntime-gpu (CUDA execution provider); default cpu
#   adapt-cpu  cpu plus the `train` extra with CPU torch (patient-specific adaptation,
#              docker/Dockerfile.adapt-cpu); the service still must not import torch
#   SOURCE     the project root (pyproject.toml); default the parent folder of this script
# environment:
#   PYTHON           interpreter that creates the venv (default python3)
#   JRS_ORT_GPU      requirement installed in place of onnxruntime for gpu; it must match the CUDA
#                    and cuDNN of the base image (default onnxruntime-gpu==1.31.1: CUDA 13, cuDNN 9)
#   JRS_TORCH        torch requirement of adapt-cpu (default: the `torch==X` pin of the train
#                    extra); it must be that pin, or pip would swap the CPU build for PyPI's CUDA
#                    build when it installs the extra
#   JRS_TORCH_INDEX  index of the CPU torch build (default https://download.pytorch.org/whl/cpu)
#   PIP_*            pip's own settings (the Dockerfiles set PIP_NO_CACHE_DIR=1)
set -euo pipefail

venv=${1:?usage: install.sh VENV [cpu|gpu|adapt-cpu] [SOURCE]}
flavour=${2:-cpu}
src=${3:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
python=${PYTHON:-python3}
ort_gpu=${JRS_ORT_GPU:-onnxruntime-gpu==1.31.1}
torch_req=${JRS_TORCH:-}
torch_index=${JRS_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}

case "$flavour" in
  cpu | gpu | adapt-cpu) ;;
  *) echo "install.sh: the flavour must be cpu, gpu or adapt-cpu, got '$flavour'" >&2; exit 2 ;;
esac
if [[ ! -f "$src/pyproject.toml" ]]; then
  echo "install.sh: no pyproject.toml in '$src' (pass the project root as SOURCE)" >&2
  exit 2
fi

"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
if [[ "$flavour" == adapt-cpu ]]; then
  # The pin of the train extra (one `torch==X` requirement), unless JRS_TORCH names it.
  pinned=$("$venv/bin/python" - "$src/pyproject.toml" <<'PY'
import sys
import tomllib

with open(sys.argv[1], "rb") as fh:
    extra = tomllib.load(fh)["project"]["optional-dependencies"]["train"]
pins = [r.replace(" ", "") for r in extra if r.replace(" ", "").lower().startswith("torch==")]
if len(pins) != 1:
    sys.exit(f"install.sh: the train extra must pin torch exactly once (torch==X), got {extra}")
print(pins[0])
PY
  )
  torch_req=${torch_req:-$pinned}
  if [[ "$torch_req" != "$pinned" ]]; then
    echo "install.sh: JRS_TORCH=$torch_req differs from the train extra's $pinned" >&2
    exit 2
  fi
  # CPU torch first, from the CPU index alone. The train extra's pin is then already satisfied
  # (2.13.0+cpu matches ==2.13.0), so the second install keeps it and takes the rest from PyPI.
  "${pip[@]}" install --index-url "$torch_index" "$torch_req"
  "${pip[@]}" install "${src}[serve,train]"
else
  # A regular (non-editable) install: the venv holds everything and no longer needs the source.
  "${pip[@]}" install "${src}[serve]"
fi
if [[ "$flavour" == gpu ]]; then
  # onnxruntime and onnxruntime-gpu install the same `onnxruntime` package; with both present the
  # CUDA provider may be missing, so the CPU build goes before the GPU build comes in.
  "${pip[@]}" uninstall --yes onnxruntime
  "${pip[@]}" install "$ort_gpu"
fi
"${pip[@]}" check

"$venv/bin/python" - "$flavour" "$torch_req" <<'PY'
import importlib.metadata
import importlib.util
import sys

import onnxruntime
import openvino

import jrs.cli
import jrs.service.app

flavour, torch_req = sys.argv[1], sys.argv[2]
if "torch" in sys.modules:
    sys.exit("install.sh: importing the service imported torch; the service must never import it")
extra = ""
if flavour != "adapt-cpu":
    if importlib.util.find_spec("torch") is not None:
        sys.exit("install.sh: torch is installed, but the service image must not contain it")
else:
    import jrs.model_export.export
    import torch
    import jrs.training.adapt
    from packaging.requirements import Requirement

    # exactly the pinned release, the CPU build
    release = torch.__version__.split("+")[0]
    if torch.version.cuda is not None or release != torch_req.split("==")[1]:
        sys.exit(f"install.sh: expected the CPU build of {torch_req}, got {torch.__version__}")
    # every requirement of the train extra is installed, in its range
    for text in importlib.metadata.requires("jrs") or []:
        req = Requirement(text)
        if req.marker is None or not req.marker.evaluate({"extra": "train"}):
            continue
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            sys.exit(f"install.sh: {req} of the train extra is not installed")
        if not req.specifier.contains(version, prereleases=True):
            sys.exit(f"install.sh: {req.name} {version} does not satisfy {req} (train extra)")
    extra = f"; torch {torch.__version__} (CPU, {torch.get_num_threads()} threads)"
providers = onnxruntime.get_available_providers()
if flavour == "gpu" and "CUDAExecutionProvider" not in providers:
    sys.exit(f"install.sh: onnxruntime has no CUDAExecutionProvider (providers: {providers})")
# the CPU engine (JRS_ENGINE=auto on the CPU): OpenVINO must see the CPU
capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
print(
    f"install.sh: jrs ({flavour}) ready; onnxruntime {onnxruntime.__version__} {providers}; "
    f"openvino {openvino.__version__} CPU {list(capabilities)}{extra}"
)
PY
