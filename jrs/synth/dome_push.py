"""The dome engine's push field and its numerical inverse (see `jrs.synth.dome_engine`).

Part of the held-out "dome" deformation family. On the box grid (frame I) the push is
``d = W (1 - P) (s A + a Q) + W_p P D_p`` (the pieces of `jrs.synth.dome_pieces`):

* `assemble_push` weights the pieces for given amplitudes, leaving the bladder amplitude ``s``
  free (`Push`: ``d = s A' + B'``);
* `solve_bladder` finds ``s`` by bisection so that the bladder's volume ratio
  ``sum f_B det(I + grad d) / sum f_B`` meets a target;
* `min_det_jacobian` is the det J check of a push;
* `invert_push` solves the pull inverse ``v(p) = -d(p + v(p))`` by fixed-point iteration.

Conventions (DESIGN.md): LPS mm, arrays (z, y, x), vector components (x, y, z).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from jrs.core.fields import jacobian_determinant
from jrs.core.geometry import Geometry, Volume
from jrs.synth.dome_pieces import Anatomy, Pieces, gland_push
from jrs.synth.grid_boxes import index_box

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

#: fixed-point inversion: stop below this residual (mm) or after this many iterations.
INVERSION_TOL_MM = 0.01
INVERSION_MAX_ITER = 60


@dataclass(eq=False)
class Push:
    """The push field as ``s A' + B'`` (A' the weighted bladder field, B' the rest).

    Attributes:
        a: (bz, by, bx, 3) float32 weighted bladder field A', mm per unit s (None: no bladder).
        b: (bz, by, bx, 3) float32 rest of the push B' (rectum and glands), mm.
    """

    a: F32 | None
    b: F32

    def at(self, s: float) -> F32:
        """The push ``s A' + B'`` (bz, by, bx, 3) float32 mm for bladder amplitude `s`."""
        return self.b if self.a is None else self.b + np.float32(s) * self.a


def assemble_push(
    pc: Pieces, an: Anatomy, rectum_mm: float, pitch_deg: float, translation_mm: F64
) -> Push:
    """Weighted pieces for the given amplitudes (the bladder amplitude ``s`` left free).

    Args:
        pc: the pieces on the box grid.
        an: the anatomy (grid and node positions).
        rectum_mm: rectal push amplitude ``a``, mm.
        pitch_deg: the glands' pitch about the LPS x axis, degrees.
        translation_mm: (3,) the glands' translation ``t_p``, mm.

    Returns:
        The push ``W (1 - P) (s A + a Q) + W_p P D_p`` as `Push`.
    """
    free = pc.weight if pc.zone is None else pc.weight * (1.0 - pc.zone)
    rest = np.zeros((*an.grid.shape, 3), np.float32)
    if pc.rectum is not None:
        rest += np.float32(rectum_mm) * pc.rectum
    rest *= free[..., None]
    if pc.zone is not None and pc.zone_weight is not None:
        rigid = gland_push(pc, an.pts, pitch_deg, translation_mm)
        rest += (pc.zone * pc.zone_weight)[..., None] * rigid
    a = None if pc.bladder is None else pc.bladder * free[..., None]
    return Push(a=a, b=rest)


def _grad(field: F32, step: float) -> F32:
    """Central-difference Jacobian ``d field_c / d x_a`` (..., 3, 3) of a field on an LPS grid."""
    out = np.empty((*field.shape[:3], 3, 3), np.float32)
    for c in range(3):
        gz, gy, gx = np.gradient(field[..., c], step)
        out[..., c, 0], out[..., c, 1], out[..., c, 2] = gx, gy, gz
    return out


def _det3(m: npt.NDArray[Any]) -> npt.NDArray[Any]:
    return (
        m[..., 0, 0] * (m[..., 1, 1] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 1])
        - m[..., 0, 1] * (m[..., 1, 0] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 0])
        + m[..., 0, 2] * (m[..., 1, 0] * m[..., 2, 1] - m[..., 1, 1] * m[..., 2, 0])
    )


def solve_bladder(push: Push, pc: Pieces, step: float, target: float) -> tuple[float, float]:
    """Bisection for the bladder amplitude ``s`` whose push meets the volume ratio `target`.

    The ratio of the push is ``sum f_B det(I + grad d) / sum f_B`` over the bladder's box; ``s``
    is searched in [-0.9, 1.5] (the bounds when the target lies beyond them).

    Args:
        push: the assembled push.
        pc: the pieces (bladder fraction and box).
        step: box grid spacing, mm.
        target: daily / planning bladder volume to meet.

    Returns:
        (s, estimated ratio); (0, 1) without a bladder.
    """
    if push.a is None or pc.bladder_box is None or pc.bladder_frac is None:
        return 0.0, 1.0
    box = pc.bladder_box
    # gradients on the box grown by one node, so central differences match the full field's
    grown = tuple(
        slice(max(sl.start - 1, 0), min(sl.stop + 1, n))
        for sl, n in zip(box, push.b.shape[:3], strict=True)
    )
    inner = tuple(
        slice(sl.start - g.start, sl.start - g.start + (sl.stop - sl.start))
        for sl, g in zip(box, grown, strict=True)
    )
    ga = _grad(np.ascontiguousarray(push.a[grown]), step)[inner]
    gb = _grad(np.ascontiguousarray(push.b[grown]), step)[inner]
    gb += np.eye(3, dtype=np.float32)
    f = pc.bladder_frac[box]
    sel = f > 0
    ga, gb, w = ga[sel].astype(np.float64), gb[sel].astype(np.float64), f[sel].astype(np.float64)
    total = float(w.sum())

    def ratio(s: float) -> float:
        return float((w * _det3(gb + s * ga)).sum()) / total

    lo, hi = -0.9, 1.5
    r_lo, r_hi = ratio(lo), ratio(hi)
    if target <= r_lo:
        return lo, r_lo
    if target >= r_hi:
        return hi, r_hi
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        r_mid = ratio(mid)
        if r_mid < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-6:
            break
    s = 0.5 * (lo + hi)
    return s, ratio(s)


def min_det_jacobian(field: F32, grid: Geometry) -> float:
    """Smallest ``det(I + grad d)`` of a (bz, by, bx, 3) displacement on `grid` (mm)."""
    return float(jacobian_determinant(Volume(field, grid.with_frame(None))).min())


def invert_push(d: F32, step: float) -> tuple[F32, float, int]:
    """Pull inverse of a push: ``v(p) = -d(p + v(p))`` by fixed-point iteration, node by node.

    Trilinear sampling (``map_coordinates``, order 1, zero outside the grid). Each node is
    iterated on its own (its fixed point depends on `d` alone) until its residual is below
    `INVERSION_TOL_MM`; a node whose steps flip direction without shrinking by half (a local
    stretch of the push above 2) is damped, ``v += w (-d(p + v) - v)`` with ``w`` halved down
    to 1/8.

    Args:
        d: (bz, by, bx, 3) push displacement, mm (LPS components), LPS-aligned grid.
        step: grid spacing, mm.

    Returns:
        (v (bz, by, bx, 3) mm, max residual ``|v + d(p + v)|`` of the returned v in mm,
        iterations of the slowest node).
    """
    v = np.zeros_like(d)
    box = index_box(np.any(d != 0, axis=-1), 0)
    if box is None:
        return v, 0.0, 0
    reach = int(np.ceil(float(np.sqrt((d**2).sum(axis=-1)).max()) / step)) + 2
    sub_box = tuple(
        slice(max(sl.start - reach, 0), min(sl.stop + reach, n))
        for sl, n in zip(box, d.shape[:3], strict=True)
    )
    comps = [np.ascontiguousarray(d[..., c]) for c in range(3)]
    origin = np.array([sl.start for sl in sub_box], np.float32)  # (z, y, x)
    shape = tuple(sl.stop - sl.start for sl in sub_box)
    nodes = np.indices(shape, dtype=np.float32).reshape(3, -1) + origin[:, None]
    cur = -np.stack([c[sub_box].reshape(-1) for c in comps])  # (3 xyz, N): v of each node
    n = cur.shape[1]
    damp = np.ones(n, np.float32)
    last = np.full(n, np.inf, np.float32)
    prev = np.zeros_like(cur)
    final = np.zeros(n, np.float32)
    active = np.arange(n)
    inv = np.float32(1.0 / step)
    n_iter = 0
    while active.size:
        now = cur[:, active]
        coords = nodes[:, active] + now[::-1] * inv  # (z, y, x) voxel coordinates of p + v
        cand = -np.stack(
            [ndimage.map_coordinates(c, coords, order=1, mode="constant", cval=0.0) for c in comps]
        )
        move = cand - now
        res = np.sqrt((move**2).sum(axis=0))
        final[active] = res  # the residual of the current v
        if n_iter >= INVERSION_MAX_ITER:
            break
        going = res >= INVERSION_TOL_MM
        active, move, res = active[going], move[:, going], res[going]
        flip = ((move * prev[:, active]).sum(axis=0) < 0) & (res > 0.5 * last[active])
        damp[active[flip]] = np.maximum(damp[active[flip]] * 0.5, 0.125)
        cur[:, active] += damp[active] * move
        prev[:, active] = move
        last[active] = res
        n_iter += 1
    v[sub_box] = cur.T.reshape((*shape, 3))
    return v, float(final.max()), n_iter
