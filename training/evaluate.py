"""Evaluate trained networks on held-out pairs with whole-scan tiled inference (METHOD.md).

For each pair (1 mm grid) the network runs over the whole padded scan in windows
(:mod:`jrs.inference.tiling`, the same tiling as the ONNX inference: by default aligned to multiples
of 4 and overlapping by 4 output voxels, so that the stitched outputs equal one window covering the
whole scan); the high-level outputs are stitched into full volumes:

* segmentation path: ``argmax`` of the stitched logits (= of their softmax);
* registration path: the stitched high-level DVF (voxels of the 1 mm grid = mm) warps the whole
  moving label map once (one-hot channels, trilinear, then ``argmax``).

Both are post-processed without looking at the ground truth (:mod:`jrs.inference.postprocess`): the
largest connected component per organ, the two largest for the seminal vesicles. A network with both
paths is also scored on their per-organ fusion (``fused``, :func:`jrs.inference.fusion.fuse`: by
default the ``weighted`` method, 0.5 / 0.5, from the soft-max of the logits and the trilinearly
warped one-hot moving labels), as the pipeline's path choice ``fusion`` would contour it. Metrics
per
organ: DSC, MSD and HD95 (mm, :mod:`jrs.core.metrics`); DVF quality
(:func:`jrs.qa.figures.jacobian_stats`): Jacobian determinant of ``x -> x + u(x)`` over the body
(its standard deviation, the folding fraction ``det <= 0`` and the std of ``log det`` over ``det >
0``). Results go to a per-pair CSV and a Markdown report in the layout of the paper's Tables 3-5,
with a paired Wilcoxon signed-rank test of every network/path against the best one (lowest mean
MSD).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from jrs.core.errors import InvalidInput
from jrs.core.geometry import Geometry, Volume
from jrs.core.labels import BLADDER, LABELS, PROSTATE, RECTUM, SEMINAL_VESICLES
from jrs.core.metrics import dice, surface_distances
from jrs.inference.fusion import FusionSpec, fuse_network_paths, probability_source, softmax_source
from jrs.inference.postprocess import COMPONENTS_KEPT, keep_largest_components
from jrs.inference.tiling import ALIGNMENT, SEAM_OVERLAP, run_tiled
from jrs.qa.figures import jacobian_stats as qa_jacobian_stats
from jrs.training.data import AIR, TrainingPair
from jrs.training.earlier_metrics import EarlierEvaluation
from jrs.training.networks import NUM_CLASSES, build
from jrs.training.warp import warp_labels

log = logging.getLogger(__name__)

#: Organs evaluated, in the paper's table order.
ORGANS: tuple[int, ...] = (PROSTATE, SEMINAL_VESICLES, RECTUM, BLADDER)
#: Evaluation column -> key of :func:`jrs.qa.figures.jacobian_stats`.
JACOBIAN_COLUMNS: dict[str, str] = {
    "jac_std": "std",
    "folding": "folding_fraction",
    "log_jac_std": "log_std",
}

# : Post-processing of a predicted label map:
# :func:`jrs.inference.postprocess.keep_largest_components` : (largest component per organ, two for
# the seminal vesicles; :data:`COMPONENTS_KEPT`).
postprocess = keep_largest_components
#: Output paths of a network (``fused``: the two fused per organ, :mod:`jrs.inference.fusion`).
PATHS: tuple[str, ...] = ("seg", "reg", "fused")
#: Metrics per organ.
METRICS: tuple[str, ...] = ("dsc", "msd", "hd95")

__all__ = [
    "COMPONENTS_KEPT",
    "EXPORT_METRICS_FILE",
    "JACOBIAN_COLUMNS",
    "ORGANS",
    "EvaluationReport",
    "Prediction",
    "evaluate",
    "export_metrics",
    "jacobian_stats",
    "load_network",
    "organ_metrics",
    "postprocess",
    "predict_pair",
    "predict_volume",
    "report_markdown",
]


@dataclass
class Prediction:
    """Whole-scan outputs of one network on one pair (arrays on the pair's 1 mm grid).

    Attributes:
        seg: ``(D, H, W)`` uint8 labels from the segmentation path, or ``None``.
        dvf: ``(3, D, H, W)`` float32 displacement (voxels = mm), channels (x, y, z), or ``None``.
        warped: ``(D, H, W)`` uint8 moving labels warped by ``dvf`` (argmax), or ``None``.
        seg_logits: ``(5, D, H, W)`` float32 stitched logits (``predict_pair(keep_soft=True)``
            only), or ``None``.
        reg_probs: ``(5, D, H, W)`` float32 one-hot moving labels warped trilinearly
            (``keep_soft=True`` only), or ``None``.
    """

    seg: npt.NDArray[np.uint8] | None = None
    dvf: npt.NDArray[np.float32] | None = None
    warped: npt.NDArray[np.uint8] | None = None
    seg_logits: npt.NDArray[np.float32] | None = None
    reg_probs: npt.NDArray[np.float32] | None = None

    def labels(self) -> dict[str, npt.NDArray[np.uint8]]:
        """Path name (``"seg"``, ``"reg"``) -> label map, for the paths the network has."""
        out: dict[str, npt.NDArray[np.uint8]] = {}
        if self.seg is not None:
            out["seg"] = self.seg
        if self.warped is not None:
            out["reg"] = self.warped
        return out


def _device_of(net: nn.Module) -> torch.device:
    for p in net.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def predict_volume(
    net: nn.Module,
    fixed: npt.ArrayLike,
    moving: npt.ArrayLike,
    moving_labels: npt.ArrayLike,
    window: int = 96,
    batch_size: int = 1,
    amp: bool = False,
    seam_overlap: int = SEAM_OVERLAP,
    alignment: int = ALIGNMENT,
) -> dict[str, npt.NDArray[np.float32]]:
    """Run a network over whole volumes in windows (:func:`jrs.inference.tiling.run_tiled`).

    The network is put in eval mode for the call and restored afterwards.

    Args:
        net: A network of :mod:`jrs.training.networks` (forward ``net(fixed, moving,
            moving_labels)``).
        fixed: ``(D, H, W)`` daily CT on the 1 mm grid, ``clip(HU) / 1000``.
        moving: ``(D, H, W)`` pre-aligned planning CT, same grid and transform.
        moving_labels: ``(D, H, W)`` pre-aligned planning labels 0..4 (any dtype).
        window: Input window ``n`` (multiple of 4, >= 44; >= 52 where an axis needs several
            windows with the default seam overlap).
        batch_size: Windows per forward pass.
        amp: Autocast to float16 (CUDA only).
        seam_overlap: As in :func:`jrs.inference.tiling.plan_tiles` (0 with ``alignment=1``:
            METHOD.md's
            plain abutting windows).
        alignment: As in :func:`jrs.inference.tiling.plan_tiles`.

    Returns:
        ``"seg"`` -> ``(5, D, H, W)`` high-level logits and ``"dvf"`` -> ``(3, D, H, W)``
        high-level displacement (voxels = mm, channels (x, y, z)), float32, for the paths the
        network has.
    """
    device = _device_of(net)
    volume = np.stack([np.asarray(v, dtype=np.float32) for v in (fixed, moving, moving_labels)])
    was_training = net.training
    net.eval()
    use_amp = amp and device.type == "cuda"

    def predict(batch: npt.NDArray[Any]) -> dict[str, npt.NDArray[np.float32]]:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            out = net(x[:, 0:1], x[:, 1:2], x[:, 2:3])
        res: dict[str, npt.NDArray[np.float32]] = {}
        if out.seg:
            res["seg"] = out.seg["high"].float().cpu().numpy()
        if out.dvf:
            res["dvf"] = out.dvf["high"].float().cpu().numpy()
        return res

    try:
        return run_tiled(
            volume,
            window,
            predict,
            fill=(AIR, AIR, 0.0),
            batch_size=batch_size,
            seam_overlap=seam_overlap,
            alignment=alignment,
        )
    finally:
        net.train(was_training)


@dataclass
class _Stitched:
    """One tiled pass of a network (what `jrs.inference.cascade.refine` reads)."""

    dvf: npt.NDArray[np.float32]
    seg_logits: npt.NDArray[np.float32] | None
    seg_probs: npt.NDArray[np.float32] | None = None  # (the logits are kept instead)


class _TiledBackend:
    """A torch network as a `jrs.inference.backend.NetworkBackend` (tiled, `predict_volume`)."""

    def __init__(self, net: nn.Module, window: int, batch_size: int, amp: bool) -> None:
        self.net, self.window, self.batch_size, self.amp = net, window, batch_size, amp

    def predict(
        self,
        fixed: npt.NDArray[np.float32],
        moving: npt.NDArray[np.float32],
        moving_labels: npt.NDArray[np.float32],
    ) -> _Stitched:
        out = predict_volume(
            self.net, fixed, moving, moving_labels, self.window, self.batch_size, self.amp
        )
        return _Stitched(out["dvf"], out.get("seg"))


@torch.no_grad()
def predict_pair(
    net: nn.Module,
    pair: TrainingPair,
    window: int = 96,
    batch_size: int = 1,
    amp: bool = False,
    keep_soft: bool = False,
    null_correction: bool = False,
    passes: int = 1,
) -> Prediction:
    """Run a network over a whole pair with tiled inference (:func:`predict_volume`).

    The network is put in eval mode for the call and restored afterwards.

    Args:
        net: A network of :mod:`jrs.training.networks` (forward ``net(fixed, moving,
            moving_labels)``).
        pair: The pair (``fixed``, ``moving``, ``moving_labels`` ``(D, H, W)`` on the 1 mm grid).
        window: Input window ``n`` (multiple of 4, >= 44).
        batch_size: Windows per forward pass.
        amp: Autocast to float16 (CUDA only).
        keep_soft: Also keep the stitched logits and the soft warped labels (for fusion).
        null_correction: Subtract the field of the planning scan paired with itself, as the
            pipeline does (`jrs.inference.null_correction`).
        passes: Network passes, as the pipeline runs them (`jrs.inference.cascade`: each pass after
            the
            first registers what the field so far left over; networks with a field only).

    Returns:
        The :class:`Prediction` (paths the network lacks are ``None``).
    """
    stitched = predict_volume(
        net, pair.fixed, pair.moving, pair.moving_labels, window, batch_size, amp
    )
    if null_correction and "dvf" in stitched:
        null = predict_volume(
            net, pair.moving, pair.moving, pair.moving_labels, window, batch_size, amp
        )
        stitched["dvf"] = stitched["dvf"] - null["dvf"]
        del null
    if passes > 1 and "dvf" in stitched:
        from jrs.inference.cascade import refine

        backend = _TiledBackend(net, window, batch_size, amp)
        dvf, last, _ = refine(
            backend,
            Geometry(pair.fixed.shape, origin=np.zeros(3), spacing=np.ones(3)),
            np.asarray(pair.fixed, np.float32),
            np.asarray(pair.moving, np.float32),
            np.asarray(pair.moving_labels, np.float32),
            np.asarray(stitched["dvf"], np.float32),
            passes,
            null_correction=null_correction,
        )
        stitched["dvf"] = dvf
        if last is not None and last.seg_logits is not None:  # the last pass's segmentation
            stitched["seg"] = last.seg_logits
    pred = Prediction()
    if "seg" in stitched:
        pred.seg = np.argmax(stitched["seg"], axis=0).astype(np.uint8)
        if keep_soft:
            pred.seg_logits = stitched["seg"]
    if "dvf" in stitched:
        dvf = np.ascontiguousarray(stitched["dvf"], dtype=np.float32)
        pred.dvf = dvf
        device = _device_of(net)
        labels = torch.from_numpy(pair.moving_labels.astype(np.int64))[None, None].to(device)
        u = torch.from_numpy(dvf)[None].to(device)
        soft = warp_labels(labels, u, num_classes=NUM_CLASSES)
        pred.warped = soft.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()
        if keep_soft:
            pred.reg_probs = soft[0].float().cpu().numpy()
    return pred


def organ_metrics(
    prediction: npt.NDArray[np.integer[Any]],
    reference: npt.NDArray[np.integer[Any]],
    geometry: Geometry | None = None,
) -> dict[int, dict[str, float]]:
    """DSC, MSD and HD95 (mm) per organ.

    Args:
        prediction: ``(D, H, W)`` predicted label map.
        reference: ``(D, H, W)`` ground-truth label map.
        geometry: The grid (default: 1 mm isotropic).

    Returns:
        Organ label -> ``{"dsc", "msd", "hd95"}``; distances are NaN when either mask is empty.
    """
    geo = geometry or Geometry(shape=reference.shape, origin=np.zeros(3), spacing=np.ones(3))
    out: dict[int, dict[str, float]] = {}
    for organ in ORGANS:
        a, b = prediction == organ, reference == organ
        sd = surface_distances(a, b, geo)
        out[organ] = {"dsc": dice(a, b), "msd": sd.msd, "hd95": sd.hd95}
    return out


def jacobian_stats(
    dvf: npt.NDArray[np.floating[Any]],
    mask: npt.NDArray[np.integer[Any]] | None = None,
    spacing: float = 1.0,
) -> dict[str, float]:
    """Jacobian-determinant statistics of ``x -> x + u(x)`` under the evaluation's column names.

    :func:`jrs.qa.figures.jacobian_stats` on the evaluation's channels-first array (identity
    direction, isotropic spacing), its keys renamed by :data:`JACOBIAN_COLUMNS`.

    Args:
        dvf: ``(3, D, H, W)`` displacement in mm, channels (x, y, z) = (W, H, D) axes.
        mask: ``(D, H, W)`` region (the body); the whole grid when ``None``.
        spacing: Grid spacing (mm).

    Returns:
        ``{"jac_std", "folding", "log_jac_std"}``: std of det J, fraction of voxels with
        det J <= 0, std of log det J over det J > 0 (NaN for an empty region).

    Raises:
        InvalidInput: When ``dvf`` is not ``(3, D, H, W)``.
    """
    arr = np.asarray(dvf, dtype=np.float32)
    if arr.ndim != 4 or arr.shape[0] != 3:
        raise InvalidInput(f"dvf must be (3, D, H, W), got shape {arr.shape}")
    geometry = Geometry(
        shape=(arr.shape[1], arr.shape[2], arr.shape[3]),
        origin=np.zeros(3),
        spacing=np.full(3, float(spacing)),
    )
    stats = qa_jacobian_stats(Volume(np.moveaxis(arr, 0, -1), geometry), mask)
    return {column: stats[key] for column, key in JACOBIAN_COLUMNS.items()}


def load_network(path: Path | str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a network from a training checkpoint.

    Args:
        path: A checkpoint written by :class:`jrs.training.trainer.Trainer` (``last.pt``,
            ``best.pt``).
        device: Where to put the network.

    Returns:
        ``(network in eval mode, checkpoint metadata without the state dicts)``.

    Raises:
        InvalidInput: When the file is missing or not a training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise InvalidInput(f"{path}: not a readable torch checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "network" not in ckpt:
        raise InvalidInput(f"{path}: not a jrs training checkpoint (no 'model'/'network' entries)")
    net = build(ckpt["network"]["name"], **ckpt["network"].get("overrides", {}))
    net.load_state_dict(ckpt["model"])
    net.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scaler", "rng")}
    return net, meta


@dataclass
class EvaluationReport:
    """What :func:`evaluate` computed.

    Attributes:
        rows: One dict per (model, path, pair, organ) with ``dsc``, ``msd``, ``hd95``.
        jacobian: One dict per (model, pair) with the Jacobian statistics.
        markdown: The Markdown report.
        csv_path: Per-pair CSV written, if any.
        markdown_path: Markdown file written, if any.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    jacobian: list[dict[str, Any]] = field(default_factory=list)
    markdown: str = ""
    csv_path: Path | None = None
    markdown_path: Path | None = None

    def summary(self) -> dict[tuple[str, str, int], dict[str, float]]:
        """(model, path, organ) -> mean of each metric over pairs (NaNs skipped)."""
        out: dict[tuple[str, str, int], dict[str, float]] = {}
        for key, vals in _group(self.rows).items():
            out[key] = {m: _nanmean([v[m] for v in vals]) for m in METRICS}
        return out


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else math.nan


def _group(
    rows: Sequence[Mapping[str, Any]],
) -> dict[tuple[str, str, int], list[Mapping[str, Any]]]:
    groups: dict[tuple[str, str, int], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["path"], int(r["organ"])), []).append(r)
    return groups


def evaluate(
    models: Mapping[str, nn.Module],
    pairs: Sequence[TrainingPair],
    out_dir: Path | str | None = None,
    window: int = 96,
    batch_size: int = 1,
    progress: Callable[[str], None] | None = None,
    fusion: Any = "weighted",
    null_correction: bool = False,
    passes: int = 1,
    earlier: Sequence[EarlierEvaluation] = (),
) -> EvaluationReport:
    """Evaluate networks on held-out pairs and write the CSV and Markdown report.

    Args:
        models: Display name -> network.
        pairs: Held-out pairs (with ground-truth ``fixed_labels``).
        out_dir: Where to write ``metrics.csv``, ``jacobian.csv`` and ``report.md`` (``None``:
            nothing written).
        window: Tiled-inference window ``n``.
        batch_size: Windows per forward pass.
        progress: Called with a short message after each (model, pair).
        fusion: How the ``fused`` rows of networks with both paths are made: a
            :class:`jrs.inference.fusion.FusionSpec`, or a method name (``weighted``, ``staple``,
            ``evidence``; weights 0.5 / 0.5); ``None``: no fused rows.
        null_correction: Subtract each network's field of the planning scan paired with
            itself, as the pipeline does (`jrs.inference.null_correction`; the release evaluation).
        passes: Network passes per pair, as the pipeline runs them (`jrs.inference.cascade`).
        earlier: Figures of earlier evaluations of exactly these pairs
            (:func:`jrs.training.earlier_metrics.read_evaluation`): their rows join the report, so
            networks scored in different runs are compared paired. Their model names must
            differ from ``models`` and from each other.

    Returns:
        The :class:`EvaluationReport`.

    Raises:
        InvalidInput: Without pairs, or when an earlier evaluation scores other pairs or
            repeats a model name.
    """
    if not pairs:
        raise InvalidInput("evaluation needs at least one held-out pair")
    spec = _fusion_spec(fusion)
    report = EvaluationReport()
    seen = set(models)
    for old in earlier:
        old.check_pairs(p.key for p in pairs)
        clash = sorted(old.models & seen)
        if clash:
            raise InvalidInput(
                f"{old.source}: model names {clash} are already in this evaluation; each "
                "network of a comparison needs its own name"
            )
        seen |= old.models
        report.rows.extend(old.rows)
        report.jacobian.extend(old.jacobian)
    for name, net in models.items():
        for pair in pairs:
            pred = predict_pair(
                net,
                pair,
                window=window,
                batch_size=batch_size,
                keep_soft=spec is not None,
                null_correction=null_correction,
                passes=passes,
            )
            processed = {path: postprocess(labels) for path, labels in pred.labels().items()}
            if spec is not None and pred.seg_logits is not None and pred.reg_probs is not None:
                processed["fused"] = _fused(pred, processed, spec, pair)
            for path, labels in processed.items():
                metrics = organ_metrics(labels, pair.fixed_labels)
                for organ, vals in metrics.items():
                    if organ not in pair.known:  # not delineated in this scan: no figure
                        continue
                    report.rows.append(
                        {"model": name, "path": path, "pair": pair.key, "organ": organ, **vals}
                    )
            if pred.dvf is not None:
                report.jacobian.append(
                    {"model": name, "pair": pair.key, **jacobian_stats(pred.dvf, pair.body)}
                )
            if progress is not None:
                progress(f"{name} {pair.key}")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:  # the raw figures first: a failing report must not lose them
        out.mkdir(parents=True, exist_ok=True)
        report.csv_path = out / "metrics.csv"
        _write_csv(
            report.csv_path,
            [{**r, "organ_name": LABELS[int(r["organ"])]} for r in report.rows],
            ["model", "path", "pair", "organ", "organ_name", *METRICS],
        )
        if report.jacobian:
            _write_csv(
                out / "jacobian.csv",
                report.jacobian,
                ["model", "pair", *JACOBIAN_COLUMNS],
            )
    report.markdown = report_markdown(report.rows, report.jacobian)
    if out is not None:
        report.markdown_path = out / "report.md"
        report.markdown_path.write_text(report.markdown)
        if len(models) == 1 and not earlier:  # the figures of that one model
            (out / EXPORT_METRICS_FILE).write_text(
                json.dumps(export_metrics(report, spec, [p.key for p in pairs]), indent=2) + "\n"
            )
    return report


#: The file of :func:`evaluate` that ``jrs export --metrics`` reads (one model evaluated).
EXPORT_METRICS_FILE = "export_metrics.json"
_PATH_KEYS = {"seg": "segmentation", "reg": "registration", "fused": "fusion"}


def export_metrics(
    report: EvaluationReport, fusion: Any = None, pairs: Sequence[str] = ()
) -> dict[str, Any]:
    """The held-out figures of one evaluated model in the form ``jrs export --metrics`` reads.

    ``path_dsc`` (path -> organ key -> mean DSC over the pairs that delineate the organ) lets the
    export choose each organ's output path (fusion only where it beats both paths) and derive
    the fusion weights; ``fusion`` names the method the fused figures were made with.

    Args:
        report: The evaluation of exactly one model.
        fusion: The :class:`jrs.inference.fusion.FusionSpec` of the fused rows (None: none).
        pairs: The evaluated pairs' keys (recorded).

    Returns:
        JSON-able metrics.
    """
    table: dict[str, dict[str, float]] = {}
    for (_model, path, organ), vals in report.summary().items():
        if path in _PATH_KEYS and math.isfinite(vals["dsc"]):
            table.setdefault(_PATH_KEYS[path], {})[LABELS[organ]] = round(vals["dsc"], 4)
    out: dict[str, Any] = {"path_dsc": table, "pairs": list(pairs)}
    if fusion is not None and "fusion" in table:
        out["fusion"] = {"method": fusion.method}
    return out


def _fusion_spec(fusion: Any) -> Any:
    """The :class:`jrs.inference.fusion.FusionSpec` of :func:`evaluate`'s ``fusion``."""
    if fusion is None:
        return None

    return fusion if isinstance(fusion, FusionSpec) else FusionSpec(str(fusion))  # type: ignore[arg-type]


def _fused(
    pred: Prediction,
    processed: Mapping[str, npt.NDArray[np.uint8]],
    spec: Any,
    pair: TrainingPair,
) -> npt.NDArray[np.uint8]:
    """The per-organ fusion of a prediction's post-processed paths (`jrs.inference.fusion.fuse`).

    The segmentation probabilities are the soft-max of the stitched logits and the registration
    ones the trilinearly warped one-hot moving labels, both read inside each organ's box only;
    ``evidence`` also reads the pair's two images and the DVF there.
    """
    if pred.seg_logits is None or pred.reg_probs is None or pred.dvf is None:
        raise InvalidInput("fusion needs the logits and the soft warped labels (keep_soft=True)")
    shape = processed["seg"].shape
    return fuse_network_paths(
        processed["seg"],
        processed["reg"],
        ORGANS,
        spec,
        seg_probability=softmax_source(pred.seg_logits),
        reg_probability=probability_source(pred.reg_probs),
        moving_labels=np.asarray(pair.moving_labels),
        dvf=np.ascontiguousarray(np.moveaxis(pred.dvf, 0, -1), np.float32),
        grid=Geometry(shape, origin=np.zeros(3), spacing=np.ones(3)),  # voxels = mm
        fixed=np.asarray(pair.fixed, np.float32),
        moving=np.asarray(pair.moving, np.float32),
    )


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _fmt(values: Sequence[float], digits: int = 2) -> str:
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return "n/a"
    text = (
        f"{finite.mean():.{digits}f} ± {finite.std():.{digits}f} ({np.median(finite):.{digits}f})"
    )
    missing = arr.size - finite.size
    return text + (f" [{missing} empty]" if missing else "")


def _wilcoxon(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import wilcoxon

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    d = x[ok] - y[ok]
    if d.size < 2 or np.all(d == 0):
        return math.nan
    try:
        return float(wilcoxon(x[ok], y[ok]).pvalue)
    except ValueError:
        return math.nan


def report_markdown(
    rows: Sequence[Mapping[str, Any]], jacobian: Sequence[Mapping[str, Any]] = ()
) -> str:
    """Markdown tables like the paper's Tables 3-5.

    One table per metric (DSC, MSD, HD95): a row per network and output path, a column per organ,
    cells ``mean ± sd (median)`` over pairs (``[k empty]`` counts pairs where an organ was not
    predicted at all, which have no surface distance). Then the Jacobian statistics, and the
    paired Wilcoxon signed-rank p-values of each network/path against the best one (lowest mean
    MSD over organs), per organ, on MSD and DSC.

    Args:
        rows: Per (model, path, pair, organ) metric rows from :func:`evaluate`.
        jacobian: Per (model, pair) Jacobian rows.

    Returns:
        The Markdown text.
    """
    groups: dict[tuple[str, str, int], list[Mapping[str, Any]]] = defaultdict(list)
    groups.update(_group(rows))  # an organ no pair delineates (e.g. SV on Pelvic-Ref): no rows
    entries = sorted({(m, p) for m, p, _ in groups}, key=lambda e: (e[0], PATHS.index(e[1])))
    organ_names = [LABELS[o] for o in ORGANS]
    n_pairs = len({r["pair"] for r in rows})
    lines = [f"# Evaluation ({n_pairs} held-out pairs, whole-scan tiled inference, 1 mm grid)", ""]
    units = {"dsc": "", "msd": " (mm)", "hd95": " (mm)"}
    for metric in METRICS:
        lines += [f"## {metric.upper()}{units[metric]}: mean ± sd (median)", ""]
        lines.append("| network | path | " + " | ".join(organ_names) + " |")
        lines.append("|---|---|" + "---|" * len(ORGANS))
        for model, path in entries:
            cells = [_fmt([r[metric] for r in groups[(model, path, o)]]) for o in ORGANS]
            lines.append(f"| {model} | {path} | " + " | ".join(cells) + " |")
        lines.append("")
    if jacobian:
        lines += ["## DVF quality (Jacobian determinant over the body)", ""]
        lines.append("| network | std(det J) | folding fraction (det J <= 0) | std(log det J) |")
        lines.append("|---|---|---|---|")
        for model in sorted({j["model"] for j in jacobian}):
            js = [j for j in jacobian if j["model"] == model]
            cells = [
                _fmt([j["jac_std"] for j in js], 3),
                _fmt([j["folding"] for j in js], 4),
                _fmt([j["log_jac_std"] for j in js], 3),
            ]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines.append("")
    if entries:
        mean_msd = {
            e: _nanmean([_nanmean([r["msd"] for r in groups[(*e, o)]]) for o in ORGANS])
            for e in entries
        }
        finite = {e: v for e, v in mean_msd.items() if math.isfinite(v)}
        best = min(finite, key=lambda e: finite[e]) if finite else entries[0]
        lines += [
            f"## Paired Wilcoxon signed-rank test against the best ({best[0]} / {best[1]}, "
            "lowest mean MSD)",
            "",
            "p-values per organ on MSD and DSC (n/a: fewer than 2 usable pairs or identical).",
            "",
            "| network | path | " + " | ".join(f"{o} MSD / DSC" for o in organ_names) + " |",
            "|---|---|" + "---|" * len(ORGANS),
        ]
        for e in entries:
            if e == best:
                continue
            cells = []
            for o in ORGANS:
                a, b = groups[(*e, o)], groups[(*best, o)]
                by_pair_b = {r["pair"]: r for r in b}
                common = [r for r in a if r["pair"] in by_pair_b]
                p_msd = _wilcoxon(
                    [r["msd"] for r in common], [by_pair_b[r["pair"]]["msd"] for r in common]
                )
                p_dsc = _wilcoxon(
                    [r["dsc"] for r in common], [by_pair_b[r["pair"]]["dsc"] for r in common]
                )
                cells.append(f"{_p(p_msd)} / {_p(p_dsc)}")
            lines.append(f"| {e[0]} | {e[1]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _p(p: float) -> str:
    return "n/a" if not math.isfinite(p) else f"{p:.3g}"
