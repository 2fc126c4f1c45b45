import numpy as np
import pytest

from jrs.geometry import Geometry, Volume
from jrs.qa import QaThresholds, StructureQa, flag_dvf, flag_structure, jacobian_stats

G = Geometry((20, 22, 24), origin=[0, 0, 0], spacing=[1.0, 1.0, 2.0])


def test_jacobian_stats_uniform_scaling_and_folding() -> None:
    pts = G.voxel_centres()
    centre = pts.reshape(-1, 3).mean(axis=0)
    scaled = Volume(((1.1 - 1) * (pts - centre)).astype(np.float32), G)  # x -> 1.1 x
    interior = np.zeros(G.shape, bool)
    interior[1:-1, 1:-1, 1:-1] = True  # ITK's boundary derivatives are one-sided
    s = jacobian_stats(scaled, interior)
    assert s["min"] == pytest.approx(1.331, abs=1e-3)
    assert s["std"] == pytest.approx(0.0, abs=1e-4)
    assert s["folding_fraction"] == 0.0
    folded = Volume(((-2.0 - 1) * (pts - centre)).astype(np.float32), G)  # x -> -2 x
    assert jacobian_stats(folded)["folding_fraction"] == 1.0
    assert flag_dvf(jacobian_stats(folded))
    assert not flag_dvf(s)
    mask = np.zeros(G.shape, bool)
    assert np.isnan(jacobian_stats(scaled, mask)["std"])


def test_structure_flags_name_their_reason() -> None:
    ok = flag_structure(StructureQa("Prostate", "prostate", "segmentation", 40.0, 42.0, 0.9))
    assert ok.flags == []
    shrunk = flag_structure(StructureQa("Prostate", "prostate", "segmentation", 40.0, 20.0, 0.6))
    assert any("volume changed by -50 %" in f for f in shrunk.flags)
    assert any("paths disagree (Dice 0.60" in f for f in shrunk.flags)
    bladder = flag_structure(StructureQa("Bladder", "bladder", "segmentation", 200.0, 380.0))
    assert bladder.flags == []  # bladder filling may double
    lost = flag_structure(StructureQa("SV", "seminal_vesicles", "registration", 8.0, 0.1))
    assert any("nearly empty" in f for f in lost.flags)
    edge = flag_structure(
        StructureQa("PTV", None, "registration", 100.0, 101.0, touches_crop_border=True),
        QaThresholds(),
    )
    assert any("border" in f for f in edge.flags)
