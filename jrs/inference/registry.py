"""Where models live: the ONE model-directory rule.

A model folder given by the user (``--model``, ``JRS_MODEL_DIR``) may be a version folder
(``model.onnx`` + ``metadata.json``), a model folder of numeric versions (the newest is used) or a
root of ``<name>/<version>`` folders (`resolve_model_dir`); without one, the newest bundled version
under ``models/<name>/`` is used (`default_model_dir`). The command, the pipeline and the service
all resolve through here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from jrs.core.errors import ModelNotReady

log = logging.getLogger(__name__)


#: where the bundled models live (``models/<name>/<version>``), overridable by JRS_MODEL_DIR.
BUNDLED_MODELS = Path(__file__).resolve().parents[2] / "models"


def default_model_dir(name: str = "crossstitch") -> Path:
    """``$JRS_MODEL_DIR`` resolved by `resolve_model_dir`, else the newest bundled version.

    Raises:
        ModelNotReady: no model there (the message says what is expected).
    """
    given = os.environ.get("JRS_MODEL_DIR")
    if given:
        return _resolved(Path(given), name)
    root = BUNDLED_MODELS / name
    versions = sorted(
        (p for p in root.glob("*") if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    )
    if not versions:
        raise ModelNotReady(
            f"no model under {root}: expected {root}/<version>/model.onnx (export one with "
            "`jrs export`, or pass --model DIR)"
        )
    return versions[-1]


def _versions(folder: Path) -> list[Path]:
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(found, key=lambda p: int(p.name))


def resolve_model_dir(model_dir: Path | None, name: str = "crossstitch") -> Path | None:
    """The model version folder named by ``JRS_MODEL_DIR`` (None: the pipeline's default).

    Accepted: a version folder (``model.onnx`` + ``metadata.json``, also when one of them is
    missing so that the loader names it), a model folder of numeric versions (the newest is
    used), or a root of ``<name>/<version>`` folders.

    Args:
        model_dir: the configured folder, or None.
        name: the model looked for under a root folder.

    Returns:
        The version folder, or None when `model_dir` is None.

    Raises:
        ModelNotReady: the folder does not exist or holds no model (the message says what is
            expected), so that a wrong path never falls back to another model.
    """
    if model_dir is None:
        return None
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ModelNotReady(
            f"JRS_MODEL_DIR {folder} does not exist; set it to a model version folder "
            "(models/<name>/<version> with model.onnx and metadata.json)"
        )
    if (folder / "model.onnx").exists() or (folder / "metadata.json").exists():
        return folder
    versions = _versions(folder) or (_versions(folder / name) if (folder / name).is_dir() else [])
    if versions:
        return versions[-1]
    raise ModelNotReady(
        f"JRS_MODEL_DIR {folder} holds no model: expected model.onnx and metadata.json there, "
        f"numeric version folders, or {name}/<version>/ folders"
    )


def _resolved(folder: Path, name: str) -> Path:
    found = resolve_model_dir(folder, name)
    if found is None:  # pragma: no cover - a given folder resolves or raises
        raise ModelNotReady(f"no model under {folder}")
    return found
