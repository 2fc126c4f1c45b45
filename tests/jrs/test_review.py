from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from jrs.core.errors import InvalidInput
from jrs.core.geometry import PATIENT_POSITION_DIRECTIONS, Geometry, Volume, reorient
from jrs.qa.review import render_review


def _case() -> tuple[Volume, dict[str, np.ndarray]]:
    g = Geometry((30, 60, 70), origin=[-35, -30, -30], spacing=[1.0, 1.0, 2.0])
    c = g.voxel_centres()
    sphere = np.linalg.norm(c - [0, 0, 0], axis=-1) < 12
    ct = np.where(np.linalg.norm(c[..., :2], axis=-1) < 28, 40.0, -1000.0).astype(np.float32)
    return Volume(ct, g), {"Prostate": sphere}


def test_review_png_shows_solid_and_dashed_contours(tmp_path: Path) -> None:
    ct, contours = _case()
    planned = {"Prostate": np.roll(contours["Prostate"], 4, axis=2)}
    out = render_review(
        ct,
        contours,
        tmp_path / "review.png",
        planned=planned,
        colors={"Prostate": (255, 0, 0)},
        flagged=["Prostate"],
        title="fraction 1",
    )
    img = mpimg.imread(out)
    assert img.shape[0] > 200 and img.shape[1] > 600
    red = (img[..., 0] > 0.8) & (img[..., 1] < 0.3) & (img[..., 2] < 0.3)
    assert red.sum() > 100  # the contour (and the red legend entry) are drawn


def test_review_independent_of_storage_orientation(tmp_path: Path) -> None:
    ct, contours = _case()
    a = mpimg.imread(render_review(ct, contours, tmp_path / "a.png"))
    ffs = reorient(ct, PATIENT_POSITION_DIRECTIONS["FFS"])
    mask_ffs = (
        reorient(
            Volume(contours["Prostate"].astype(np.uint8), ct.geometry),
            PATIENT_POSITION_DIRECTIONS["FFS"],
        ).array
        > 0
    )
    b = mpimg.imread(render_review(ffs, {"Prostate": mask_ffs}, tmp_path / "b.png"))
    assert a.shape == b.shape
    assert np.abs(a - b).mean() < 0.01


def test_review_refuses_empty_contours(tmp_path: Path) -> None:
    ct, contours = _case()
    with pytest.raises(InvalidInput, match="every contour is empty"):
        render_review(ct, {"Prostate": np.zeros_like(contours["Prostate"])}, tmp_path / "x.png")


def test_contours_are_drawn_where_the_structure_is(tmp_path: Path) -> None:
    """An anterior blob must appear in the upper half of the axial panel (radiological view)."""
    ct, contours = _case()
    g = ct.geometry
    c = g.voxel_centres()
    anterior = np.linalg.norm(c - [0, -15, 0], axis=-1) < 6  # y < 0 is anterior in LPS
    big = contours["Prostate"] | anterior
    img = mpimg.imread(
        render_review(
            ct,
            {"Blob": anterior, "Big": big},
            tmp_path / "r.png",
            colors={"Blob": (255, 0, 0), "Big": (0, 0, 255)},
            focus="Big",
        )
    )
    third = img.shape[1] // 3
    axial = img[: int(img.shape[0] * 0.85), :third]  # axial panel, legend excluded
    red = (axial[..., 0] > 0.8) & (axial[..., 1] < 0.3) & (axial[..., 2] < 0.3)
    rows = np.nonzero(red.any(axis=1))[0]
    blue = (axial[..., 2] > 0.8) & (axial[..., 0] < 0.3)
    blue_rows = np.nonzero(blue.any(axis=1))[0]
    assert rows.size and blue_rows.size
    assert rows.mean() < blue_rows.mean()  # the anterior blob sits above the big structure's centre


# ------------------------------------------------------------------ issue 13: flag marking
def _axial(img: np.ndarray) -> np.ndarray:
    return img[: int(img.shape[0] * 0.8), : img.shape[1] // 3]


def test_flagged_structure_is_marked_by_a_pattern_not_a_colour(tmp_path: Path) -> None:
    """The prostate's own colour is red: a flag must not be (only) red."""
    ct, contours = _case()
    colors = {"Prostate": (255, 0, 0)}
    plain = mpimg.imread(render_review(ct, contours, tmp_path / "a.png", colors=colors))
    flagged = mpimg.imread(
        render_review(
            ct,
            contours,
            tmp_path / "b.png",
            colors=colors,
            flagged={"Prostate": ["volume changed by +15 % from planning"]},
        )
    )

    def white(img: np.ndarray) -> int:
        return int(((img[..., 0] > 0.9) & (img[..., 1] > 0.9) & (img[..., 2] > 0.9)).sum())

    def red(img: np.ndarray) -> int:
        return int(((img[..., 0] > 0.8) & (img[..., 1] < 0.3) & (img[..., 2] < 0.3)).sum())

    # hatching, a dotted white halo and the warning glyph: white pixels on the structure
    assert white(_axial(flagged)) > white(_axial(plain)) + 100
    # and no extra red anywhere: the flag is not told by colour
    assert red(flagged) <= red(plain) * 1.2 + 50
    # the text lines above the views make the figure taller
    assert flagged.shape[0] > plain.shape[0]


def test_flag_lines_name_structure_and_reason() -> None:
    from jrs.qa.review import flag_lines, flag_reasons

    reasons = flag_reasons({"Prostate": ["volume changed by +15 %", "DVF implausible"]})
    assert flag_lines(reasons) == [
        "\u26a0 FLAG: Prostate: volume changed by +15 %",
        "\u26a0 FLAG: Prostate: DVF implausible",
    ]
    assert flag_reasons(["PTV"]) == {"PTV": ["flagged by QA"]}
