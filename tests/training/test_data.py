from pathlib import Path

import numpy as np
import pytest

from jrs.core.errors import InvalidInput
from jrs.training.data import PatchSampler, TrainingPair, discover_pairs


def _pair(shape: tuple[int, int, int] = (40, 50, 60)) -> TrainingPair:
    rng = np.random.default_rng(0)
    fixed = rng.uniform(-1, 1, shape).astype(np.float32)
    fl = np.zeros(shape, np.uint8)
    fl[5:8, 5:8, 5:8] = 4  # tiny target near a corner
    fl[30:35, 40:45, 50:55] = 1  # bladder far away
    body = np.zeros(shape, np.uint8)
    body[10:30, 10:40, 10:50] = 1
    return TrainingPair("p", fixed, -fixed, fl, (fl > 0).astype(np.uint8) * 2, body)


def test_patches_are_region_balanced_and_swapped() -> None:
    pair = _pair()
    s = PatchSampler([pair], patch_size=8, pairs_per_batch=1, swap=True, seed=1)
    assert s.batch_size == 2
    hits = {"targets": 0, "oar": 0, "torso": 0}
    for _ in range(600):
        c = s._centre(0)
        lab = pair.fixed_labels[tuple(c)]
        if lab == 4:
            hits["targets"] += 1
        elif lab == 1:
            hits["oar"] += 1
        else:
            assert pair.body[tuple(c)] == 1
            hits["torso"] += 1
    for v in hits.values():
        assert 150 < v < 250  # each region about 1/3
    b = s.sample()
    assert b.fixed.shape == (2, 1, 8, 8, 8)
    np.testing.assert_array_equal(b.fixed[1], b.moving[0])
    np.testing.assert_array_equal(b.moving[1], b.fixed[0])
    np.testing.assert_array_equal(b.fixed_labels[1], b.moving_labels[0])


def test_patches_hang_over_the_edge_with_air_padding() -> None:
    pair = _pair()
    s = PatchSampler([pair], patch_size=16, pairs_per_batch=1, swap=False, seed=0)
    crop = s._crop(pair.fixed, np.array([0, 0, 0]), -1.0)
    assert crop.shape == (16, 16, 16)
    assert np.all(crop[:8] == -1.0)
    np.testing.assert_array_equal(crop[8:, 8:, 8:], pair.fixed[:8, :8, :8])


def test_sampling_reproducible_and_resumable() -> None:
    a = PatchSampler([_pair()], patch_size=8, seed=3)
    b = PatchSampler([_pair()], patch_size=8, seed=3)
    a.sample()
    state = a.state()
    next_a = a.sample()
    b.set_state(state)
    np.testing.assert_array_equal(b.sample().fixed, next_a.fixed)


def test_cache_round_trip(tmp_path: Path) -> None:
    pair = _pair()
    pair.save(tmp_path / "p.npz")
    back = TrainingPair.load("p", tmp_path / "p.npz")
    np.testing.assert_allclose(back.fixed, pair.fixed, atol=1e-3)  # float16 storage
    np.testing.assert_array_equal(back.fixed_labels, pair.fixed_labels)


def test_discover_pairs(tmp_path: Path) -> None:
    for p in ("phantom_000", "phantom_001"):
        (tmp_path / p / "planning" / "ct").mkdir(parents=True)
        (tmp_path / p / "planning" / "rtstruct.dcm").touch()
        for k in (1, 2, 10):
            (tmp_path / p / f"fraction_{k}" / "ct").mkdir(parents=True)
            (tmp_path / p / f"fraction_{k}" / "rtstruct.dcm").touch()
    (tmp_path / "phantom_001" / "fraction_2" / "rtstruct.dcm").unlink()
    pairs = discover_pairs(tmp_path)
    assert [(r.patient, r.fraction) for r in pairs] == [
        ("phantom_000", "fraction_1"),
        ("phantom_000", "fraction_2"),
        ("phantom_000", "fraction_10"),
        ("phantom_001", "fraction_1"),
        ("phantom_001", "fraction_10"),
    ]
    assert len({r.key for r in pairs}) == 5
    with pytest.raises(InvalidInput, match="no planning/fraction pair"):
        discover_pairs(tmp_path, patients=["nobody"])
