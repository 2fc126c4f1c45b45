"""The planning scan's null field: carried onto a pair, kept on disk, asked for once per planning.

Analytic cases: a linear null field carried by a known rigid pre-alignment must equal
``L^-1 N(A(x))`` in patient coordinates; moved by a constant field it must be read there. The
cache must round-trip an entry, drop the oldest, ignore a damaged one, and never serve a
network without a model digest (a test double). End to end, a second fraction of the same
planning scan must not run the null pass again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from jrs.core.errors import InvalidInput
from jrs.core.fields import dvf_to_sitk
from jrs.core.geometry import Geometry, Volume
from jrs.inference.null_cache import (
    NullFieldCache,
    PlanningNull,
    check_null_pass,
    default_cache_root,
    model_tag,
    null_key,
    planning_null,
    transport,
    warp_null,
)


def _grid(shape: tuple[int, int, int] = (20, 22, 24), origin: float = -10.0) -> Geometry:
    return Geometry(shape=shape, origin=np.full(3, origin), spacing=np.ones(3))


def _points(grid: Geometry) -> np.ndarray:
    """(nz, ny, nx, 3) LPS points of a grid's voxels."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij")
    idx = np.stack([x, y, z], axis=-1).reshape(-1, 3).astype(float)
    return grid.index_to_physical(idx).reshape(*grid.shape, 3)


def _linear_null(grid: Geometry) -> np.ndarray:
    """N(p) = (0.02 p_x + 0.3, -0.01 p_y, 0.015 p_z - 0.2), (3, nz, ny, nx) mm."""
    p = _points(grid)
    return np.stack([0.02 * p[..., 0] + 0.3, -0.01 * p[..., 1], 0.015 * p[..., 2] - 0.2]).astype(
        np.float32
    )


def test_transport_is_the_null_field_read_through_the_prealignment_and_rotated() -> None:
    planning_grid = _grid((40, 44, 48), origin=-24.0)
    null = PlanningNull(_linear_null(planning_grid), planning_grid)
    # identity: the field itself, bit for bit
    same = transport(null, planning_grid, sitk.AffineTransform(3))
    np.testing.assert_array_equal(same, null.u0)
    # a rigid set-up: 4 deg about z and a translation, daily point -> planning point
    rigid = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.0, 0.0, np.deg2rad(4.0), (2.5, -1.5, 3.0))
    daily = _grid((16, 18, 20), origin=-9.0)
    out = transport(null, daily, rigid)
    pts = _points(daily).reshape(-1, 3)
    mapped = np.array([rigid.TransformPoint(tuple(p)) for p in pts])
    n = np.stack(
        [0.02 * mapped[:, 0] + 0.3, -0.01 * mapped[:, 1], 0.015 * mapped[:, 2] - 0.2], axis=1
    )
    matrix = np.asarray(rigid.GetMatrix()).reshape(3, 3)
    expected = (np.linalg.inv(matrix) @ n.T).reshape(3, *daily.shape)
    # a linear field is interpolated exactly (float32 rounding aside)
    np.testing.assert_allclose(out, expected, atol=2e-5)
    # the rotation matters: without it the x component is off by |N| sin 4 deg
    assert np.abs(n.T.reshape(3, *daily.shape) - expected).max() > 1e-3


def test_points_outside_the_planning_box_take_the_nearest_value() -> None:
    planning_grid = _grid((10, 10, 10), origin=0.0)
    field = np.zeros((3, 10, 10, 10), np.float32)
    field[0] = np.arange(10, dtype=np.float32)[None, None, :]  # x component = x index
    out = transport(
        PlanningNull(field, planning_grid), _grid((4, 4, 4), origin=20.0), sitk.AffineTransform(3)
    )
    assert np.all(out[0] == 9.0) and not out[1:].any()


def test_warp_null_reads_the_field_where_the_content_came_from() -> None:
    grid = _grid()
    null = _linear_null(grid)
    shift = np.zeros((*grid.shape, 3), np.float32)
    shift[..., 0] = 2.0  # T(x) = x + 2 mm along x
    moved = warp_null(null, grid, dvf_to_sitk(Volume(shift, grid)))
    np.testing.assert_allclose(moved[0, :, :, :-3], null[0, :, :, :-3] + 0.04, atol=1e-5)
    np.testing.assert_allclose(moved[1:, :, :, :-3], null[1:, :, :, :-3], atol=1e-6)
    zero = warp_null(null, grid, dvf_to_sitk(Volume(np.zeros_like(shift), grid)))
    np.testing.assert_allclose(zero, null, atol=1e-6)


def test_the_cache_round_trips_drops_the_oldest_and_survives_damage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    grid = _grid((6, 7, 8))
    cache = NullFieldCache(tmp_path / "c", max_entries=2)
    entries = [
        PlanningNull(np.full((3, 6, 7, 8), k, np.float32), grid, {"prostate": 0.9}, 1.0, f"k{k}")
        for k in range(3)
    ]
    for e in entries:
        cache.put(e)
    fresh = NullFieldCache(tmp_path / "c")  # another process: nothing in memory
    assert fresh.get("k0") is None  # the oldest went
    got = fresh.get("k2")
    assert got is not None and got.from_cache and got.planning_dice == {"prostate": 0.9}
    np.testing.assert_array_equal(got.u0, entries[2].u0)
    assert got.grid.shape == grid.shape and np.allclose(got.grid.origin, grid.origin)
    (tmp_path / "c" / "k1.npy").write_bytes(b"not numpy")
    with caplog.at_level(logging.WARNING, logger="jrs.inference.null_cache"):
        assert fresh.get("k1") is None
    assert "unreadable" in caplog.text
    # an entry without a key (a network without a digest) is never stored
    cache.put(PlanningNull(np.zeros((3, 6, 7, 8), np.float32), grid))
    assert sorted(p.name for p in (tmp_path / "c").glob("*.npy")) == ["k1.npy", "k2.npy"]


def test_the_key_follows_every_input(monkeypatch: pytest.MonkeyPatch) -> None:
    grid = _grid((4, 5, 6))
    ct = np.zeros(grid.shape, np.float32)
    labels = np.zeros(grid.shape, np.uint8)
    base = null_key("m/openvino/fp32", grid, ct, labels)
    assert base == null_key("m/openvino/fp32", grid, ct.copy(), labels.copy())
    ct2 = ct.copy()
    ct2[0, 0, 0] = 0.001
    labels2 = labels.copy()
    labels2[1, 1, 1] = 4
    moved = Geometry(shape=grid.shape, origin=grid.origin + 1.0, spacing=grid.spacing)
    others = {
        null_key("m/openvino/bf16", grid, ct, labels),
        null_key("m/openvino/fp32", grid, ct2, labels),
        null_key("m/openvino/fp32", grid, ct, labels2),
        null_key("m/openvino/fp32", moved, ct, labels),
    }
    assert base not in others and len(others) == 4

    class Engine:
        name, precision = "openvino", "fp32"

    class Net:
        def __init__(self) -> None:
            self.metadata = {"sha256": "abc"}
            self.engine = Engine()

    assert model_tag(Net()) == "abc/openvino/fp32"
    assert model_tag(object()) is None
    monkeypatch.setenv("JRS_CACHE_DIR", "off")
    assert default_cache_root() is None
    monkeypatch.setenv("JRS_CACHE_DIR", "/somewhere")
    assert default_cache_root() == Path("/somewhere")
    assert check_null_pass("pair") == "pair"
    with pytest.raises(InvalidInput, match="planning"):
        check_null_pass("daily")


class _Pred:
    def __init__(self, dvf: np.ndarray) -> None:
        self.dvf = dvf
        self.seg_probs = None


class _Counting:
    """A network double: the null field is 0.5 mm along z inside the body; counts its passes."""

    def __init__(self, digest: str | None) -> None:
        self.metadata: dict[str, Any] = {"sha256": digest} if digest else {}
        self.calls = 0

    def predict(self, fixed: np.ndarray, moving: np.ndarray, labels: np.ndarray) -> _Pred:
        self.calls += 1
        dvf = np.zeros((3, *fixed.shape), np.float32)
        dvf[2] = np.where(moving > -0.5, 0.5, 0.0)
        return _Pred(dvf)


def test_planning_null_runs_once_per_planning_scan_for_a_real_model(tmp_path: Path) -> None:
    grid = Geometry(shape=(30, 40, 40), origin=np.zeros(3), spacing=np.array([1.0, 1.0, 2.0]))
    ct = np.full(grid.shape, -1000.0, np.float32)
    ct[5:25, 8:32, 8:32] = 40.0
    labels = np.zeros(grid.shape, np.uint8)
    labels[12:18, 15:25, 15:25] = 4
    box = (np.array([5.0, 5.0, 10.0]), np.array([35.0, 35.0, 50.0]))
    cache = NullFieldCache(tmp_path / "n")
    net = _Counting("digest")
    first = planning_null(net, Volume(ct, grid), Volume(labels, grid), box, cache)
    again = planning_null(net, Volume(ct, grid), Volume(labels, grid), box, cache)
    other = planning_null(
        net, Volume(ct, grid), Volume(labels, grid), box, NullFieldCache(tmp_path / "n")
    )
    assert net.calls == 1 and not first.from_cache and again.from_cache and other.from_cache
    np.testing.assert_array_equal(other.u0, first.u0)
    assert first.u0.shape == (3, *first.grid.shape) and float(first.u0[2].max()) == 0.5
    double = _Counting(None)  # no model digest: computed every time, never stored
    planning_null(double, Volume(ct, grid), Volume(labels, grid), box, cache)
    planning_null(double, Volume(ct, grid), Volume(labels, grid), box, cache)
    assert double.calls == 2
    assert len(list((tmp_path / "n").glob("*.json"))) == 1
    assert json.loads(next((tmp_path / "n").glob("*.json")).read_text())["format"] == 1
