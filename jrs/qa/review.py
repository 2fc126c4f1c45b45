"""Review figure: the daily CT in three orthogonal views with the new and the planned contours.

The daily CT and the masks are resampled onto a 1 mm canonical grid (LPS axes) around the
structures, so every scan orientation (HFS, FFS, prone, oblique) is shown the same way: axial in
the radiological convention (patient's right on the left, anterior up), sagittal with anterior on
the left and cranial up, coronal with the patient's right on the left and cranial up. New contours
are solid; planning contours (after pre-alignment, before deformation) are dashed.

Structures flagged by QA are marked by a pattern, never by a colour (an organ may have any colour:
the prostate's default is red): their inside is hatched, their outline gets a dotted white halo,
a "⚠" marker sits on them in every view, and a "⚠ FLAG: <name>: <reason>" line per flag is
printed above the views.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from jrs.core.errors import InvalidInput
from jrs.core.geometry import Geometry, Volume
from jrs.inference.preprocess import canonical_grid, mask_box

DEFAULT_COLOR = (0, 255, 0)
#: the mark of a flagged structure (a glyph, not a colour).
FLAG_MARK = "\u26a0"
FLAG_HATCH = "////"


def _rgb(color: Sequence[int] | None) -> tuple[float, float, float]:
    c = color if color is not None else DEFAULT_COLOR
    return (c[0] / 255.0, c[1] / 255.0, c[2] / 255.0)


def _plane(grid: Geometry, axis: int, index: int) -> Geometry:
    """One plane of a grid: array axis ``axis`` (0: z, 1: y, 2: x) kept at ``index`` only."""
    start = [0.0, 0.0, 0.0]  # (i, j, k)
    start[2 - axis] = float(index)
    shape = list(grid.shape)
    shape[axis] = 1
    return Geometry(
        (shape[0], shape[1], shape[2]),
        grid.index_to_physical(start),
        grid.spacing,
        grid.direction,
        grid.frame_of_reference_uid,
    )


def render_review(
    ct: Volume,
    contours: Mapping[str, npt.NDArray[np.bool_]],
    path: Path | str,
    *,
    planned: Mapping[str, npt.NDArray[np.bool_]] | None = None,
    colors: Mapping[str, Sequence[int]] | None = None,
    focus: str | None = None,
    flagged: Sequence[str] | Mapping[str, Sequence[str]] = (),
    title: str = "",
    margin_mm: float = 40.0,
    window: tuple[float, float] = (40.0, 400.0),
) -> Path:
    """Write a PNG with axial, sagittal and coronal views of the daily CT and contours.

    Args:
        ct: daily CT in HU.
        contours: ROI name -> (nz, ny, nx) mask on the CT grid (drawn solid).
        path: PNG file to write.
        planned: ROI name -> mask on the CT grid of the planning contours after pre-alignment
            (drawn dashed).
        colors: ROI name -> (r, g, b) 0..255.
        focus: ROI whose centroid the three planes cross (default: the first non-empty ROI).
        flagged: ROI names QA flagged, or ROI name -> the flags' reasons (hatched, haloed,
            marked with "⚠" and listed as "⚠ FLAG: <name>: <reason>").
        title: figure title (never patient identifiers).
        margin_mm: margin around the structures shown, mm.
        window: display window (level, width) in HU.

    Returns:
        The path written.
    """
    nonempty = [name for name, m in contours.items() if np.any(m)]
    if not nonempty:
        raise InvalidInput("nothing to review: every contour is empty")
    union = np.zeros(ct.geometry.shape, dtype=bool)
    for name in nonempty:
        union |= np.asarray(contours[name], dtype=bool)
    lower, upper = mask_box(union, ct.geometry, margin_mm)
    grid = canonical_grid(lower, upper, 1.0)
    centre_name = (
        focus
        if focus is not None and focus in contours and np.any(contours[focus])
        else nonempty[0]
    )
    # the three planes through the focus's centroid, each resampled on its own (1 mm grid)
    centroid = np.argwhere(np.asarray(contours[centre_name], dtype=bool)).mean(axis=0)
    at = grid.physical_to_index(ct.geometry.index_to_physical(centroid[::-1])[None])[0]
    k, j, i = np.clip(np.round(at[::-1]).astype(int), 0, np.asarray(grid.shape) - 1)
    planes = [_plane(grid, 0, int(k)), _plane(grid, 2, int(i)), _plane(grid, 1, int(j))]

    def on_planes(array: npt.ArrayLike, fill: float) -> list[npt.NDArray[np.float32]]:
        image = Volume(np.asarray(array, dtype=np.float32), ct.geometry).to_sitk()
        cuts = []
        for axis, plane in zip((0, 2, 1), planes, strict=True):
            out = sitk.Resample(
                image, plane.reference_image(), sitk.Transform(), sitk.sitkLinear, fill
            )
            cuts.append(np.take(sitk.GetArrayFromImage(out), 0, axis=axis))
        return cuts

    def mask_planes(mask: npt.ArrayLike) -> list[npt.NDArray[np.bool_]]:
        return [c >= 0.5 for c in on_planes(mask, 0.0)]

    reasons = flag_reasons(flagged)
    image_cuts = on_planes(ct.array, -1000.0)
    solid = {n: mask_planes(contours[n]) for n in contours}
    dashed = {n: mask_planes(m) for n, m in (planned or {}).items()}
    level, width = window
    vmin, vmax = level - width / 2, level + width / 2

    def cut(a: Sequence[np.ndarray], view: int) -> np.ndarray:
        return a[view]

    fig, axes = plt.subplots(1, 3, figsize=(15, 5.6), facecolor="black")
    names = ["axial", "sagittal", "coronal"]
    for view, ax in enumerate(axes):
        # contour() without X, Y puts Z[r, c] at (c, r): the same data coordinates as imshow's,
        # whatever its origin, so only imshow gets the origin (passing it to contour flips it)
        origin = "upper" if view == 0 else "lower"
        ax.imshow(cut(image_cuts, view), cmap="gray", vmin=vmin, vmax=vmax, origin=origin)
        for name, mask in dashed.items():
            sl = cut(mask, view)
            if sl.any():
                ax.contour(
                    sl,
                    levels=[0.5],
                    colors=[_rgb((colors or {}).get(name))],
                    linewidths=1.0,
                    linestyles="dashed",
                )
        for name, mask in solid.items():
            sl = cut(mask, view)
            if not sl.any():
                continue
            if name in reasons:
                _mark_flagged(ax, sl)
            ax.contour(
                sl,
                levels=[0.5],
                colors=[_rgb((colors or {}).get(name))],
                linewidths=1.4,
            )
        ax.set_title(names[view], color="white")
        ax.axis("off")
    handles: list[Line2D | Patch] = []
    for n in nonempty:
        if n in reasons:
            handles.append(
                Patch(
                    facecolor="black",
                    edgecolor=_rgb((colors or {}).get(n)),
                    hatch=FLAG_HATCH,
                    lw=2,
                    label=f"{FLAG_MARK} {n}",
                )
            )
        else:
            handles.append(Line2D([0], [0], color=_rgb((colors or {}).get(n)), lw=2, label=n))
    handles.append(Line2D([0], [0], color="white", lw=1, ls="dashed", label="planning (dashed)"))
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=min(len(handles), 6),
        facecolor="black",
        labelcolor="white",
        frameon=False,
    )
    lines = flag_lines(reasons)
    if lines:
        fig.text(  # above the title: the first thing a reviewer reads
            0.01,
            1.02,
            "\n".join(lines),
            color="white",
            fontsize=10,
            va="bottom",
            ha="left",
            fontweight="bold",
            bbox={"facecolor": "black", "edgecolor": "white", "linestyle": "dashed"},
        )
    if title:
        fig.suptitle(title, color="white")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor="black", bbox_inches="tight")
    plt.close(fig)
    return out


def flag_reasons(flagged: Sequence[str] | Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """ROI name -> reasons (``["flagged by QA"]`` when only names are given)."""
    if isinstance(flagged, Mapping):
        return {str(n): [str(r) for r in rs] or ["flagged by QA"] for n, rs in flagged.items()}
    return {str(n): ["flagged by QA"] for n in flagged}


def flag_lines(reasons: Mapping[str, Sequence[str]], width: int = 150) -> list[str]:
    """The text printed under the views: one ``⚠ FLAG: <name>: <reason>`` per flag (wrapped)."""
    out: list[str] = []
    for name, rs in reasons.items():
        for r in rs:
            out += textwrap.wrap(f"{FLAG_MARK} FLAG: {name}: {r}", width, subsequent_indent="    ")
    return out


def _mark_flagged(ax: plt.Axes, sl: npt.NDArray[np.bool_]) -> None:
    """Hatch a flagged structure's cut, halo its outline (dotted white), put "⚠" on it."""
    with plt.rc_context({"hatch.color": "white", "hatch.linewidth": 0.8}):
        ax.contourf(sl.astype(np.uint8), levels=[0.5, 1.5], colors="none", hatches=[FLAG_HATCH])
    ax.contour(sl, levels=[0.5], colors=["white"], linewidths=3.2, linestyles=":")
    rows, cols = np.nonzero(sl)
    top = int(np.argmin(rows))
    ax.text(
        float(cols[top]),
        float(rows[top]),
        FLAG_MARK,
        color="white",
        fontsize=13,
        ha="center",
        va="bottom",
        fontweight="bold",
        bbox={"facecolor": "black", "edgecolor": "white", "pad": 0.5},
    )
