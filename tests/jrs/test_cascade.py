"""Cascaded network passes (`jrs.inference.cascade`): composition against an analytic under-registering
network, the same scan twice, the options, and the pipeline's use of them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from jrs.core.geometry import Geometry
from jrs.inference.cascade import MAX_PASSES, network_passes, refine


@dataclass
class _Pred:
    seg_probs: np.ndarray | None
    dvf: np.ndarray


def _centroid(weights: np.ndarray) -> np.ndarray:
    """(x, y, z) centroid in voxels (= mm on the 1 mm grid) of a non-negative image."""
    idx = np.indices(weights.shape, dtype=np.float64)
    total = float(weights.sum())
    zyx = np.array([(i * weights).sum() / total for i in idx])
    return zyx[::-1]


class _HalfWayBackend:
    """Fake network that registers half of a translation: it measures the shift between the two
    images' centroids (intensity above air) and returns half of it as a constant pull field.

    For ``fixed(x) = moving(x + t)`` the true pull field is ``t``; one pass gives ``t / 2``, two
    passes ``3 t / 4``, three ``7 t / 8``. It also records the labels it was given.
    """

    metadata: ClassVar[dict[str, Any]] = {}

    def __init__(self) -> None:
        self.labels_seen: list[np.ndarray] = []

    def predict(self, fixed: np.ndarray, moving: np.ndarray, moving_labels: np.ndarray) -> _Pred:
        self.labels_seen.append(moving_labels.copy())
        shift = 0.5 * (_centroid(moving + 1.0) - _centroid(fixed + 1.0))
        dvf = np.broadcast_to(shift[:, None, None, None], (3, *fixed.shape)).astype(np.float32)
        return _Pred(None, np.ascontiguousarray(dvf))


def _blob_pair(t_xyz: tuple[float, float, float]) -> tuple[Geometry, np.ndarray, np.ndarray]:
    """A smooth blob (moving) and the same blob moved by -t (fixed(x) = moving(x + t))."""
    shape = (48, 56, 64)
    grid = Geometry(shape=shape, origin=np.array([-10.0, 20.0, 5.0]), spacing=np.ones(3))
    z, y, x = np.indices(shape, dtype=np.float64)
    centre = np.array([30.0, 28.0, 24.0])  # x, y, z voxels

    def blob(c: np.ndarray) -> np.ndarray:
        r2 = ((x - c[0]) / 8.0) ** 2 + ((y - c[1]) / 6.0) ** 2 + ((z - c[2]) / 7.0) ** 2
        return (2.0 * np.exp(-r2) - 1.0).astype(np.float32)  # air (-1) around a bright blob

    moving = blob(centre)
    fixed = blob(centre - np.asarray(t_xyz))
    return grid, fixed, moving


def _first_pass(
    backend: _HalfWayBackend, fixed: np.ndarray, moving: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    return np.asarray(backend.predict(fixed, moving, labels).dvf)


@pytest.mark.parametrize(("passes", "fraction"), [(1, 0.5), (2, 0.75), (3, 0.875)])
def test_each_pass_registers_what_the_field_so_far_left_over(passes: int, fraction: float) -> None:
    t = (8.0, -4.0, 4.0)
    grid, fixed, moving = _blob_pair(t)
    labels = (moving > 0).astype(np.float32)
    backend = _HalfWayBackend()
    u1 = _first_pass(backend, fixed, moving, labels)
    np.testing.assert_allclose(u1[:, 24, 28, 32], 0.5 * np.asarray(t), atol=0.02)
    u, _, report = refine(backend, grid, fixed, moving, labels, u1, passes, null_correction=True)
    assert report.passes == passes and len(report.residual_max_mm) == passes - 1
    # inside the volume (away from where u1 reaches past the border) the composed field is the
    # analytic fraction of the translation
    centre = u[:, 10:-10, 10:-10, 10:-10].reshape(3, -1)
    np.testing.assert_allclose(centre.mean(axis=1), fraction * np.asarray(t), atol=0.1)
    assert float(centre.std(axis=1).max()) < 0.05
    if passes >= 2:
        # the second pass saw the planning labels warped by the first field: moved by -u1
        moved = _centroid(backend.labels_seen[2]) - _centroid(backend.labels_seen[0])
        np.testing.assert_allclose(moved, -0.5 * np.asarray(t), atol=0.6)
        assert report.residual_max_mm[0] == pytest.approx(0.25 * float(np.linalg.norm(t)), abs=0.1)


def test_the_same_scan_twice_stays_exactly_zero_and_runs_no_pass() -> None:
    grid, _, moving = _blob_pair((0.0, 0.0, 0.0))
    labels = (moving > 0).astype(np.float32)
    backend = _HalfWayBackend()
    zero = np.zeros((3, *moving.shape), np.float32)
    u, pred, report = refine(backend, grid, moving, moving, labels, zero, 3, prediction="first")
    assert u is zero and not np.any(u)
    assert pred == "first" and report.passes == 1 and backend.labels_seen == []


def test_passes_from_metadata_and_override() -> None:
    assert network_passes({}) == 1
    assert network_passes({"network_passes": 2}) == 2
    for bad in (0, MAX_PASSES + 1, "2", True, 1.5, None):
        assert network_passes({"network_passes": bad}) == 1
    assert network_passes({"network_passes": 2}, 3) == 3
    for bad_override in (0, MAX_PASSES + 1, True):
        with pytest.raises(ValueError, match="network passes"):
            network_passes({}, bad_override)


class _ShiftBackend:
    """Fake network for the pipeline: half the centroid shift of the two images (as above)."""

    def __init__(self, passes: int | None) -> None:
        organs = ("prostate", "seminal_vesicles", "rectum", "bladder")
        self.metadata: dict[str, Any] = {
            "name": "fake",
            "version": "0",
            "path_choice": dict.fromkeys(organs, "registration"),
        }
        if passes is not None:
            self.metadata["network_passes"] = passes
        self.calls = 0

    def predict(self, fixed: np.ndarray, moving: np.ndarray, moving_labels: np.ndarray) -> _Pred:
        self.calls += 1
        shift = 0.5 * (_centroid(moving + 1.0) - _centroid(fixed + 1.0))
        dvf = np.broadcast_to(shift[:, None, None, None], (3, *fixed.shape)).astype(np.float32)
        return _Pred(None, np.ascontiguousarray(dvf))


@pytest.mark.integration
def test_pipeline_runs_the_passes_the_model_asks_for(tmp_path: Path) -> None:
    from jrs.core.geometry import Volume
    from jrs.pipeline.options import RecontourOptions
    from jrs.pipeline.run import recontour
    from jrs.synth import generate_fraction, generate_patient, write_fraction, write_patient

    patient = generate_patient(7, matrix=128, slice_thickness=3.0)
    write_patient(patient, tmp_path / "case")
    write_fraction(generate_fraction(patient, 1), tmp_path / "case" / "fraction_1")
    plan = tmp_path / "case" / "planning"
    daily = tmp_path / "case" / "fraction_1" / "ct"

    backend = _ShiftBackend(2)
    same = recontour(
        plan / "ct",
        plan / "rtstruct.dcm",
        plan / "ct",
        tmp_path / "same",
        RecontourOptions(device="cpu", dvf_spacing_mm=0, dvf_smoothing_mm=0.0),
        backend=backend,
    )
    assert float(np.abs(Volume.read(str(same.dvf)).array).max()) < 0.05
    assert same.qa_data["network"]["cascade"]["passes"] == 1  # nothing moved: no refining pass

    fields = {}
    for passes in (1, 2):
        backend = _ShiftBackend(passes)
        res = recontour(
            plan / "ct",
            plan / "rtstruct.dcm",
            daily,
            tmp_path / f"p{passes}",
            RecontourOptions(device="cpu", dvf_spacing_mm=0, dvf_smoothing_mm=0.0),
            backend=backend,
        )
        qa = json.loads(res.qa.read_text())
        assert qa["network"]["cascade"]["passes"] == passes
        # each pass, and the planning scan's null pass once (carried onto the refining pass)
        assert backend.calls == passes + 1
        fields[passes] = Volume.read(str(res.dvf)).array
    assert not np.allclose(fields[1], fields[2], atol=0.05)
    # the option overrides the model's number
    backend = _ShiftBackend(2)
    res = recontour(
        plan / "ct",
        plan / "rtstruct.dcm",
        daily,
        tmp_path / "override",
        RecontourOptions(device="cpu", dvf_spacing_mm=0, network_passes=1),
        backend=backend,
    )
    assert res.qa_data["network"]["cascade"]["passes"] == 1 and backend.calls == 2
    # the null pass on every pair: each pass and its own null pass
    backend = _ShiftBackend(2)
    res = recontour(
        plan / "ct",
        plan / "rtstruct.dcm",
        daily,
        tmp_path / "per_pair",
        RecontourOptions(device="cpu", dvf_spacing_mm=0, dvf_smoothing_mm=0.0, null_pass="pair"),
        backend=backend,
    )
    assert res.qa_data["network"]["cascade"]["passes"] == 2 and backend.calls == 4
    # the per-pair and the carried null pass agree where the fake's null field is smooth
    np.testing.assert_allclose(Volume.read(str(res.dvf)).array, fields[2], atol=0.05)
