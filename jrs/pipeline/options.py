"""What a re-contouring run is asked to do (`RecontourOptions`) and what it gives back."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from jrs.core.errors import InvalidInput
from jrs.core.geometry import Volume
from jrs.core.labels import (
    LABELS,
    SynonymTable,
)
from jrs.inference.null_cache import (
    default_cache_root,
)
from jrs.qa.figures import QaThresholds
from jrs.qa.plausibility import PlausibilityLimits
from jrs.registration.focus import DEFAULT_PREALIGN, PrealignMode

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


Path_ = Literal["segmentation", "registration", "fusion"]


FarFieldMode = Literal["bony", "focus"]


FAR_FIELD_MODES: tuple[str, ...] = ("bony", "focus")


#: The output paths a path choice may name.
PATHS: tuple[str, ...] = ("segmentation", "registration", "fusion")


def parse_path_choice(
    values: Iterable[str] | None, source: str = "--path-choice"
) -> dict[str, str]:
    """Parse ``ORGAN=PATH`` items (comma-separated or repeated) into organ key -> path.

    ``ORGAN`` is an organ key (``prostate``, ``seminal_vesicles``, ``rectum``, ``bladder``) or
    ``all``; ``PATH`` is ``segmentation``, ``registration`` or ``fusion``. Later items win.

    Args:
        values: The items, e.g. ``["all=registration", "prostate=fusion"]`` or
            ``["all=registration,prostate=fusion"]``.
        source: Where they come from (``--path-choice``, ``JRS_PATH_CHOICE``), for errors.

    Returns:
        Organ key -> path (empty for no items).

    Raises:
        InvalidInput: For an item that is not ``ORGAN=PATH`` with a known organ and path.
    """
    organs = list(LABELS.values())
    out: dict[str, str] = {}
    for item in (part.strip() for value in values or [] for part in value.split(",")):
        if not item:
            continue
        organ, sep, path = (x.strip() for x in item.partition("="))
        if not sep or path not in PATHS or organ not in (*organs, "all"):
            raise InvalidInput(
                f"{source} {item!r}: expected ORGAN=PATH with ORGAN one of "
                f"{', '.join(organs)} or all, and PATH one of {', '.join(PATHS)}"
            )
        out.update(dict.fromkeys(organs, path) if organ == "all" else {organ: path})
    return out


#: Default spacing of the written DVF (``dvf.mha``, ``registration.dcm``), mm.
DEFAULT_DVF_SPACING_MM = 3.0


@dataclass
class RecontourOptions:
    """Options of `recontour`.

    Attributes:
        method: ``network`` (the model) or ``iterative`` (B-spline baseline, registration path).
        model_dir: ``models/<name>/<version>`` folder; default the bundled model.
        device: ``auto``, ``cpu`` or ``cuda`` (network method).
        engine: ``auto`` (ONNX Runtime on CUDA, else OpenVINO on the CPU, else ONNX Runtime),
            ``onnxruntime`` or ``openvino`` (see `jrs.inference.load_model`).
        precision: ``auto`` (bf16 with OpenVINO on a CPU that has it, else fp32), ``fp32``,
            ``bf16`` or ``fp16`` (TensorRT).
        synonyms: ROI-name synonym table.
        path_choice: organ key -> ``segmentation``, ``registration`` or ``fusion`` (the two
            paths fused, `jrs.inference.fusion`, with the method and per-organ weights of the
            model's metadata ``fusion``; 0.5 / 0.5 ``weighted`` without); missing organs use the
            model's validated choice (metadata ``path_choice``), else ``segmentation``.
        margin_mm: margin around the pre-aligned planning organs for the network box, mm.
        thresholds: QA thresholds.
        plausibility: limits of the plausibility checks run before the network
            (`jrs.qa.plausibility`); a failed check refuses the network method, and is a warning
            of the iterative method.
        dvf_spacing_mm: write the DVF (``dvf.mha``, ``registration.dcm``) on a grid over the
            daily CT (same orientation, covering it) with this spacing, mm; an axis whose CT
            spacing is coarser keeps the CT's. None (or 0) = the daily CT grid itself.
        fusion_method: ``weighted`` or ``staple``: overrides the method of the model's metadata
            ``fusion`` for the organs fused (None: the model's, else ``weighted``).
        keep_fusion: also fuse every organ the path choice does not (network method), for
            validation: kept in `RecontourResult.path_labels` (``fusion``, and the pre-aligned
            planning organs as ``prealigned``), never written.
        null_correction: subtract the network's field for the planning scan paired with
            itself (`jrs.inference.null_correction`: the same scan twice then moves nothing);
            None: the model's metadata ``null_correction``, on when absent.
        dvf_smoothing_mm: Gaussian sigma (mm) of the filter applied to the network's final
            field (`jrs.inference.smoothing`; 0: none); None: the model's metadata
            ``dvf_smoothing_mm``, none when absent.
        network_passes: network passes on the pair (`jrs.inference.cascade`: each pass after the
            first
            registers what the field so far left over); None: the model's metadata
            ``network_passes``, 1 when absent.
        prealign: ``prostate`` (default): the whole-body rigid match refined rigidly on the
            planning prostate and seminal vesicles with their surroundings
            (`jrs.registration.focus`; the whole-body affine when the planning scan has neither);
            ``affine``: the whole-body rigid then affine match alone.
        method_consensus: with ``--method iterative``, also run the network (when a model
            loads) and compare each organ's contour with the network's registration path of it
            (`jrs.qa.figures.StructureQa.method_dice`, flag ``method_disagreement``); about a tenth
            of the iterative run (docs/benchmarks.md).
        far_field: ``bony`` (default): outside the network box the mapping follows a rigid
            match of the bones (`jrs.registration.far_field`), blended smoothly from the box's
            mapping over `jrs.registration.far_field.BLEND_MM`; ``focus``: the pre-alignment of the
            box everywhere outside it (the mapping before the bony match existed).
        refine: ``on``: the network's field is refined on the pair
            (`jrs.registration.instance_optimisation`: a coarse B-spline registration on top of it,
            kept per organ where it improves the image agreement around the organ); ``off``
            (default: on the held-out cases measured so far it changed no organ's DSC by more than
            0.001, at about 30 s on two cores, docs/benchmarks.md): the network's field as it is.
        null_pass: ``planning`` (default): the null-field correction's pass runs once per
            planning scan, on the planning box, is kept in ``cache_dir`` and is carried onto
            each pair and cascaded pass (`jrs.inference.null_cache`: two network passes fewer per
            run); ``pair``: it runs on every pair and every cascaded pass.
        cache_dir: the product's cache folder (``null-fields/``; OpenVINO's compiled models
            under ``openvino/``): ``$JRS_CACHE_DIR``, else ``~/.cache/jrs``; None: no cache
            on disk.
    """

    method: Literal["network", "iterative"] = "network"
    model_dir: Path | None = None
    device: str = "auto"
    engine: str = "auto"
    precision: str = "auto"
    synonyms: SynonymTable | None = None
    path_choice: Mapping[str, Path_] = field(default_factory=dict)
    margin_mm: float = 30.0
    thresholds: QaThresholds = field(default_factory=QaThresholds)
    plausibility: PlausibilityLimits = field(default_factory=PlausibilityLimits)
    dvf_spacing_mm: float | None = DEFAULT_DVF_SPACING_MM
    fusion_method: str | None = None
    keep_fusion: bool = False
    null_correction: bool | None = None
    dvf_smoothing_mm: float | None = None
    network_passes: int | None = None
    prealign: PrealignMode = DEFAULT_PREALIGN
    method_consensus: bool = True
    far_field: FarFieldMode = "bony"
    refine: str = "off"
    null_pass: str = "planning"
    cache_dir: Path | None = field(default_factory=default_cache_root)


@dataclass
class RecontourResult:
    """Files written by `recontour` and the QA it computed.

    Attributes:
        out_dir: output folder.
        rtstruct: daily RTSTRUCT.
        dvf: ``dvf.mha`` (pull, mm, daily grid, affine folded in).
        registration: DICOM Deformable Spatial Registration.
        qa: ``qa.json``.
        review: ``review.png``.
        qa_data: the content of ``qa.json``.
        path_labels: the organ label maps (ids of `jrs.core.labels`, post-processed) of each output
            path on the network grid (1 mm box): ``segmentation`` (network method only),
            ``registration`` (or the iterative result), ``fusion`` (the organs fused; every
            organ with ``keep_fusion``), ``chosen`` and, with ``keep_fusion``, ``prealigned``
            (the planning organs after the pre-alignment alone) and ``unaligned`` (the planning
            organs as they lie in patient coordinates: no registration); kept for validation,
            not written.
    """

    out_dir: Path
    rtstruct: Path
    dvf: Path
    registration: Path
    qa: Path
    review: Path
    qa_data: dict[str, Any]
    path_labels: dict[str, Volume] = field(default_factory=dict)
