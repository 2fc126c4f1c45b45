import numpy as np

from jrs.inference.postprocess import keep_largest_components


def test_keeps_largest_component_per_organ_and_two_for_seminal_vesicles() -> None:
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[2:8, 2:8, 2:8] = 4  # prostate, big
    lab[15:17, 15:17, 15:17] = 4  # prostate, stray island
    lab[2:5, 12:15, 2:5] = 3  # SV left
    lab[2:5, 12:15, 10:14] = 3  # SV right (bigger)
    lab[12:13, 2:3, 12:13] = 3  # SV stray voxel
    lab[10:12, 10:12, 2:4] = 1  # bladder
    out = keep_largest_components(lab)
    assert (out[15:17, 15:17, 15:17] == 0).all()
    assert (out[2:8, 2:8, 2:8] == 4).all()
    assert (out[2:5, 12:15, 2:5] == 3).all() and (out[2:5, 12:15, 10:14] == 3).all()
    assert out[12, 2, 12] == 0
    assert (out == 1).sum() == 8
    assert out.dtype == np.uint8


def test_diagonal_neighbours_are_connected() -> None:
    lab = np.zeros((5, 5, 5), np.uint8)
    lab[1, 1, 1] = lab[2, 2, 2] = lab[3, 3, 3] = 2
    np.testing.assert_array_equal(keep_largest_components(lab), lab)
