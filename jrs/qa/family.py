"""Contours of one organ share their mapping's doubts.

A structure set often holds several contours of one organ: the clinician's (``Bladder``) and
automatic ones (``Bladder_DL``, ``Bladder_MBS``) that are propagated as ordinary ROIs
(`jrs.core.labels.SynonymTable.resolve`). They lie in the same region of the DVF, so a flag that
says the *mapping* is in doubt there holds for all of them, while the figures that raise it are
often measured on one only (the organ's Jacobian and the two methods' agreement are measured on the
used contour).

`flag_same_organ` adds ``same_organ_flagged`` to every contour of an organ (its
`jrs.qa.figures.StructureQa.organ_family`) when another contour of it carries one of `SPREAD_FLAGS`.
Flags about a contour itself (its volume, its fit to the image's edges, its paths' agreement:
the automatic contours have no paths; the scans' agreement in a band around it) are not
shared. `spread_mask` is the same rule on arrays, for the calibration (`research.qa_calibration`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from jrs.qa.figures import StructureQa

#: The flags that say the mapping is in doubt around a contour (not the contour itself).
#: ``image_disagreement`` was one too; on 43 calibration cases, leaving one case out, spreading it
#: caught no bad contour more and flagged more good ones (docs/qa.md), so it is not shared.
SPREAD_FLAGS: tuple[str, ...] = (
    "misregistration",
    "jacobian_outliers",
    "method_disagreement",
)
#: The flag code added.
CODE = "same_organ_flagged"


def spread_mask(
    fired: npt.NDArray[np.bool_], group: npt.NDArray[np.integer]
) -> npt.NDArray[np.bool_]:
    """Which items have *another* member of their group among the fired ones.

    Args:
        fired: (n,) items flagged by one of `SPREAD_FLAGS`.
        group: (n,) group id of each item (one organ of one run), -1 for an item in none.

    Returns:
        (n,) bool.
    """
    fired = np.asarray(fired, bool)
    group = np.asarray(group, np.int64)
    out = np.zeros(fired.shape, bool)
    member = group >= 0
    if not member.any():
        return out
    counts = np.bincount(group[member], weights=fired[member].astype(np.float64))
    others = counts[group[member]] - fired[member]
    out[member] = others > 0.5
    return out


def family_groups(structures: Sequence[StructureQa]) -> npt.NDArray[np.int64]:
    """(n,) group id per structure: one per organ family with two contours or more, else -1."""
    keys = [s.organ_family for s in structures]
    sizes: dict[str, int] = {}
    for k in keys:
        if k:
            sizes[k] = sizes.get(k, 0) + 1
    ids = {k: i for i, k in enumerate(sorted(k for k, n in sizes.items() if n > 1))}
    return np.array([ids.get(k, -1) if k else -1 for k in keys], np.int64)


def flag_same_organ(structures: Sequence[StructureQa]) -> None:
    """Add ``same_organ_flagged`` where another contour of the organ has a mapping flag.

    Args:
        structures: one run's structures, already flagged (`jrs.qa.figures.flag_structure`); changed
            in
            place.
    """
    group = family_groups(structures)
    fired = np.array([any(c in SPREAD_FLAGS for c in s.flag_codes) for s in structures], bool)
    for i in np.nonzero(spread_mask(fired, group))[0]:
        s = structures[int(i)]
        if CODE in s.flag_codes:
            continue
        others = [
            o for j, o in enumerate(structures) if j != i and group[j] == group[i] and fired[j]
        ]
        codes = sorted({c for o in others for c in o.flag_codes if c in SPREAD_FLAGS})
        names = ", ".join(repr(o.name) for o in others)
        organ = (s.organ_family or "organ").replace("_", " ")
        s.flag_codes.append(CODE)
        s.flags.append(
            f"another contour of the {organ} ({names}) is flagged for its mapping "
            f"({', '.join(codes)}): the mapping is in doubt there; check this one too"
        )
