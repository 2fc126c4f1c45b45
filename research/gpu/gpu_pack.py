"""Pack a stratified subset of the training store, and the checkpoint to resume, for a lent GPU.

Run as ``python -m research.gpu.gpu_pack --store data/store_v3 --out gpu_pack [--max-mb M] [--seed
S]``.

A lent GPU machine (see ``research/notes/lent-gpu.md``) receives a copy of the
working tree plus at most 8 ignored "carry" paths, 64 MiB in all, the tree included; the 12 GB
store cannot travel. The pack holds what :mod:`research.gpu.gpu_run` trains on there:

* a subset of the store's TRAINING pairs (never a validation pair nor a pair of a held-out
  patient group), stratified by source (broad phantoms, standard phantoms, real anatomy) in the
  store's proportions at every prefix of the selection, distinct patients first;
* of each pair, ``crops_per_pair`` crops of ``crop``^3 voxels around lattice points of the
  sampling regions (targets, organs at risk, torso, in turn), with the region lattice points
  inside each crop from which a whole ``patch_size``^3 patch (plus the sampler's jitter) can be
  cut. :class:`jrs.training.data.PatchSampler` over the crops draws exactly the patches the store's
  sampler would draw around those points (up to the int16 rounding below);
* images as int16 HU (the store's ``HU / 1000`` float16 rounded to 1 HU: at most 0.5 HU off,
  against CT noise of 8-45 HU), labels as uint8, out-of-volume voxels as air / background (the
  sampler's own padding), one ``.npz`` per pair compressed with xz (``pairs/<key>.npz.xz``);
* ``checkpoint.pt``: a copy of the checkpoint to resume (default the committed campaign checkpoint
  ``models/checkpoints/crossstitch_v3_last.pt``), with its SHA-256;
* ``index.json``: what was packed, from where, and the sizes.

Pairs are added in the stratified order until the next one would exceed ``max_mb`` (checkpoint and
index included). By default ``max_mb`` is what the 64 MiB transfer leaves after the working tree
(git's tracked and untracked-not-ignored files) and a 1 MiB margin; a larger value is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import lzma
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from jrs.core.errors import InvalidInput
from jrs.training.data import AIR, TrainingPair
from jrs.training.store import REGION_STRIDE, list_store, load_stored_pair
from jrs.training.weights import file_sha256

log = logging.getLogger(__name__)

PACK_FORMAT = "jrs-gpu-pack"
PACK_VERSION = 1
#: Everything that travels to the lent GPU: working tree + carried paths (MiB).
TRAVEL_LIMIT_MB = 64.0
#: Kept free under :data:`TRAVEL_LIMIT_MB` when the pack size is chosen automatically (MiB).
MARGIN_MB = 1.0
#: Allowance for ``index.json`` in the size budget (bytes).
INDEX_ALLOWANCE = 128 * 1024
DEFAULT_CHECKPOINT = Path("models/checkpoints/crossstitch_v3_last.pt")
#: Region order of the crops (the sampler's three regions).
REGION_ORDER = ("targets", "organs_at_risk", "torso")
HU_SCALE = 1000.0  # stored images are HU / 1000
_MIB = 1024.0 * 1024.0

__all__ = [
    "DEFAULT_CHECKPOINT",
    "PACK_FORMAT",
    "Pack",
    "build_pack",
    "cut_crop",
    "load_pack",
    "select_pairs",
    "stratum",
    "training_records",
    "travelling_tree_bytes",
]


def travelling_tree_bytes(repo: Path) -> int | None:
    """Bytes of the working tree that a lent-GPU call copies (tracked + untracked-not-ignored).

    Args:
        repo: A folder inside the git checkout.

    Returns:
        The total size of the files ``git ls-files -co --exclude-standard`` lists, or ``None``
        outside a git checkout (or without git).
    """
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if top.returncode != 0:
            return None
        root = Path(top.stdout.strip())
        res = subprocess.run(
            ["git", "ls-files", "-z", "-co", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    total = 0
    for name in res.stdout.split(b"\0"):
        if name:
            path = root / name.decode("utf-8", "surrogateescape")
            try:
                total += path.lstat().st_size
            except OSError:  # listed but deleted
                continue
    return total


def stratum(record: Mapping[str, Any]) -> str:
    """The stratum of a store record: its source, plus its phantom variety when it has one.

    E.g. ``phantom-broad``, ``phantom-standard``, ``real``.
    """
    source = str(record.get("source", "unknown"))
    variety = record.get("variety")
    return f"{source}-{variety}" if variety else source


def training_records(
    store: Path, config: Mapping[str, Any] | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """The store's training records as the checkpoint's config defines them.

    Training pairs are those of ``config["data"]["store"]`` (its ``sources`` and
    ``exclude_groups``); without a store section, every pair whose source is not
    ``validation``. Pairs of a group that validation uses (the ``validation.store`` sources, or
    source ``validation``) are dropped as well, whatever their source.

    Args:
        store: The store folder.
        config: The resolved training config stored in the checkpoint (``ckpt["config"]``).

    Returns:
        ``(training records, held-out groups)``.
    """
    records = list_store(store)
    data = dict((config or {}).get("data") or {})
    st = data.get("store") or {}
    val = (data.get("validation") or {}).get("store") or {}
    sources = st.get("sources")
    val_sources = set(val.get("sources") or ["validation"]) | {"validation"}
    held = set(st.get("exclude_groups") or []) | set(val.get("exclude_groups") or [])
    held |= {str(r.get("group", r["key"])) for r in records if r.get("source") in val_sources}
    out = [
        r
        for r in records
        if r.get("source") not in val_sources
        and (sources is None or r.get("source") in sources)
        and str(r.get("group", r["key"])) not in held
    ]
    return out, sorted(held)


def select_pairs(records: Sequence[Mapping[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Order training records so that every prefix keeps the strata's proportions.

    Within a stratum the patient groups are shuffled and taken in turn (one pair of each group
    before a second of any), the pairs of a group shuffled; the strata are then interleaved by
    largest deficit (stratum share x position - pairs taken so far).

    Args:
        records: Training records of the store index.
        seed: Seed of the shuffles.

    Returns:
        All records, in packing order.
    """
    rng = np.random.default_rng(seed)
    by_stratum: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(records, key=lambda r: str(r["key"])):
        by_stratum.setdefault(stratum(r), []).append(dict(r))
    queues: dict[str, list[dict[str, Any]]] = {}
    for name, recs in sorted(by_stratum.items()):
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in recs:
            groups.setdefault(str(r.get("group", r["key"])), []).append(r)
        names = sorted(groups)
        order = [names[i] for i in rng.permutation(len(names))]
        members = {g: [groups[g][i] for i in rng.permutation(len(groups[g]))] for g in order}
        queue: list[dict[str, Any]] = []
        while any(members.values()):
            for g in order:
                if members[g]:
                    queue.append(members[g].pop(0))
        queues[name] = queue
    total = sum(len(q) for q in queues.values())
    share = {k: len(q) / total for k, q in queues.items()}
    taken = dict.fromkeys(queues, 0)
    out: list[dict[str, Any]] = []
    for k in range(total):
        open_ = [s for s in queues if taken[s] < len(queues[s])]
        best = max(open_, key=lambda s: (share[s] * (k + 1) - taken[s], share[s], s))
        out.append(queues[best][taken[best]])
        taken[best] += 1
    return out


def cut_crop(
    arr: npt.ArrayLike, origin: Sequence[int] | npt.NDArray[np.int64], edge: int, fill: float
) -> npt.NDArray[Any]:
    """A cube of ``edge``^3 voxels at ``origin`` (z, y, x), ``fill`` outside the volume.

    Args:
        arr: ``(nz, ny, nx)`` volume (memory-mapped is fine: only the crop is read).
        origin: First voxel of the cube; may lie outside the volume.
        edge: Edge of the cube (voxels).
        fill: Value of the voxels outside the volume.

    Returns:
        ``(edge, edge, edge)`` array of ``arr``'s dtype.
    """
    a = np.asarray(arr) if not isinstance(arr, np.ndarray) else arr
    lo = np.asarray(origin, np.int64)
    out = np.full((edge, edge, edge), fill, dtype=a.dtype)
    src_lo = np.maximum(lo, 0)
    src_hi = np.minimum(lo + edge, a.shape)
    if np.all(src_hi > src_lo):
        d_lo = src_lo - lo
        d_hi = d_lo + (src_hi - src_lo)
        out[d_lo[0] : d_hi[0], d_lo[1] : d_hi[1], d_lo[2] : d_hi[2]] = a[
            src_lo[0] : src_hi[0], src_lo[1] : src_hi[1], src_lo[2] : src_hi[2]
        ]
    return out


def _to_hu(image: npt.NDArray[Any], key: str) -> npt.NDArray[np.int16]:
    hu = np.rint(np.asarray(image, np.float32) * HU_SCALE)
    if hu.size and (hu.min() < -32768 or hu.max() > 32767):
        raise InvalidInput(f"{key}: intensities outside the int16 HU range; cannot pack")
    return hu.astype(np.int16)


def _crop_regions(
    regions: Mapping[str, npt.NDArray[np.int32]], origin: npt.NDArray[np.int64], edge: int, n: int
) -> dict[str, npt.NDArray[np.int16]]:
    """Region lattice points (crop coordinates) whose jittered n^3 patches lie inside the crop."""
    out: dict[str, npt.NDArray[np.int16]] = {}
    for name, pts in regions.items():
        s = REGION_STRIDE[name]
        local = np.asarray(pts, np.int64) - origin
        ok = np.all(local - n // 2 >= 0, axis=1) & np.all(
            local + s - 1 - n // 2 + n <= edge, axis=1
        )
        if ok.any():
            out[name] = local[ok].astype(np.int16)
    return out


def _pack_pair(
    folder: Path,
    record: Mapping[str, Any],
    *,
    crops: int,
    edge: int,
    n: int,
    first_region: int,
    rng: np.random.Generator,
) -> tuple[bytes, list[dict[str, Any]]]:
    """Cut, convert and compress the crops of one stored pair.

    Returns:
        ``(xz-compressed .npz bytes, crop records)``.
    """
    pair = load_stored_pair(folder)
    regions = pair.regions or {}
    present = [r for r in REGION_ORDER if r in regions and len(regions[r])]
    if not present:
        raise InvalidInput(f"{folder}: a stored pair without sampling regions")
    arrays: dict[str, npt.NDArray[Any]] = {}
    crop_records: list[dict[str, Any]] = []
    for c in range(crops):
        name = present[(first_region + c) % len(present)]
        pts = regions[name]
        centre = np.asarray(pts[int(rng.integers(len(pts)))], np.int64)
        s = REGION_STRIDE[name]
        origin = centre - edge // 2 + s // 2
        arrays[f"c{c}_fixed"] = _to_hu(cut_crop(pair.fixed, origin, edge, AIR), pair.key)
        arrays[f"c{c}_moving"] = _to_hu(cut_crop(pair.moving, origin, edge, AIR), pair.key)
        arrays[f"c{c}_fixed_labels"] = cut_crop(pair.fixed_labels, origin, edge, 0).astype(np.uint8)
        arrays[f"c{c}_moving_labels"] = cut_crop(pair.moving_labels, origin, edge, 0).astype(
            np.uint8
        )
        local = _crop_regions(regions, origin, edge, n)
        if not local:  # pragma: no cover - the chosen centre itself always fits
            raise InvalidInput(f"{pair.key}: crop {c} holds no sampling point")
        for rname, rpts in local.items():
            arrays[f"c{c}_region_{rname}"] = rpts
        crop_records.append(
            {
                "index": c,
                "around": name,
                "origin": [int(v) for v in origin],
                "points": {k: len(v) for k, v in local.items()},
            }
        )
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    return lzma.compress(buf.getvalue(), preset=6), crop_records


def _read_checkpoint_config(checkpoint: Path) -> tuple[dict[str, Any], int]:
    import torch

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "jrs-train-checkpoint":
        raise InvalidInput(f"{checkpoint}: not a jrs training checkpoint")
    return dict(ckpt.get("config") or {}), int(ckpt.get("step", 0))


def build_pack(
    store: Path,
    out: Path,
    *,
    checkpoint: Path = DEFAULT_CHECKPOINT,
    max_mb: float | None = None,
    seed: int = 0,
    crop: int | None = None,
    crops_per_pair: int = 1,
    tree_bytes: int | None = -1,
) -> dict[str, Any]:
    """Write a GPU pack: stratified training crops + the checkpoint + ``index.json``.

    Args:
        store: The training store (``jrs.training.build_data``).
        out: The pack folder (created; an existing pack there is replaced).
        checkpoint: The training checkpoint to resume on the GPU (copied into the pack).
        max_mb: Size limit of the whole pack (MiB). ``None``: :data:`TRAVEL_LIMIT_MB` minus the
            working tree minus :data:`MARGIN_MB`.
        seed: Seed of the pair order and of the crop centres.
        crop: Crop edge (voxels); default ``patch_size + 8`` (the patch, the sampler's jitter of
            up to 4 voxels, and up to +-2 voxels of extra shift).
        crops_per_pair: Crops per pair (each around a lattice point of the next region).
        tree_bytes: Size of the travelling working tree (bytes); ``-1``: measure it with git;
            ``None``: unknown (no check).

    Returns:
        The index written.

    Raises:
        InvalidInput: For a bad store or checkpoint, a crop too small for the patch, a limit
            the checkpoint alone exceeds, or a pack that would not fit the transfer with the tree.
    """
    t0 = time.monotonic()
    store, out, checkpoint = Path(store), Path(out), Path(checkpoint)
    if not checkpoint.is_file():
        raise InvalidInput(f"{checkpoint}: no checkpoint to pack")
    config, step = _read_checkpoint_config(checkpoint)
    n = int(config.get("patch_size", 64))
    edge = int(crop or n + 8)
    if edge < n + 2 * max(REGION_STRIDE.values()):
        raise InvalidInput(
            f"crop {edge} too small for {n}^3 patches: needs at least "
            f"{n + 2 * max(REGION_STRIDE.values())} (the patch plus the sampler's jitter)"
        )
    if crops_per_pair < 1:
        raise InvalidInput(f"crops_per_pair must be >= 1, got {crops_per_pair}")
    if tree_bytes == -1:
        tree_bytes = travelling_tree_bytes(Path(__file__).resolve().parent)
    tree_mb = None if tree_bytes is None else tree_bytes / _MIB
    if max_mb is None:
        if tree_mb is None:
            raise InvalidInput("not in a git checkout: give --max-mb (the working tree is unknown)")
        max_mb = TRAVEL_LIMIT_MB - tree_mb - MARGIN_MB
    if tree_mb is not None and tree_mb + max_mb > TRAVEL_LIMIT_MB:
        fit = TRAVEL_LIMIT_MB - tree_mb - MARGIN_MB
        raise InvalidInput(
            f"the working tree travels too ({tree_mb:.1f} MiB): a pack of {max_mb:.1f} MiB would "
            f"make {tree_mb + max_mb:.1f} MiB > {TRAVEL_LIMIT_MB:.0f} MiB; use --max-mb "
            f"{fit:.1f} or leave it out"
        )
    limit = int(max_mb * _MIB)
    ckpt_bytes = checkpoint.stat().st_size
    budget = limit - ckpt_bytes - INDEX_ALLOWANCE
    if budget <= 0:
        raise InvalidInput(
            f"--max-mb {max_mb:.1f}: the checkpoint alone is {ckpt_bytes / _MIB:.1f} MiB"
        )
    records, held = training_records(store, config)
    if not records:
        raise InvalidInput(f"{store}: no training pair (after dropping validation groups)")
    order = select_pairs(records, seed)
    if out.exists():
        shutil.rmtree(out)
    (out / "pairs").mkdir(parents=True)
    rng = np.random.default_rng([seed, 1])
    packed: list[dict[str, Any]] = []
    used = 0
    stop_reason = "all training pairs packed"
    for pos, rec in enumerate(order):
        data, crops = _pack_pair(
            store / str(rec["key"]),
            rec,
            crops=crops_per_pair,
            edge=edge,
            n=n,
            first_region=pos,
            rng=rng,
        )
        if used + len(data) > budget:
            stop_reason = f"size limit ({max_mb:.1f} MiB) reached"
            break
        name = f"{rec['key']}.npz.xz"
        (out / "pairs" / name).write_bytes(data)
        used += len(data)
        packed.append(
            {
                "key": str(rec["key"]),
                "group": str(rec.get("group", rec["key"])),
                "source": rec.get("source"),
                "stratum": stratum(rec),
                "known": [int(k) for k in rec.get("known", (1, 2, 3, 4))],
                "file": f"pairs/{name}",
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "crops": crops,
            }
        )
    if not packed:
        raise InvalidInput(f"--max-mb {max_mb:.1f}: not even one pair fits beside the checkpoint")
    shutil.copyfile(checkpoint, out / "checkpoint.pt")
    available: dict[str, int] = {}
    for r in records:
        available[stratum(r)] = available.get(stratum(r), 0) + 1
    chosen: dict[str, int] = {}
    for p in packed:
        chosen[p["stratum"]] = chosen.get(p["stratum"], 0) + 1
    from jrs.training.runtime import git_sha

    index: dict[str, Any] = {
        "format": PACK_FORMAT,
        "version": PACK_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_sha": git_sha(),
        "store": str(store),
        "seed": seed,
        "patch_size": n,
        "crop": edge,
        "crops_per_pair": crops_per_pair,
        "image_encoding": "int16 HU (store float16 HU/1000 rounded to 1 HU); labels uint8",
        "compression": "xz (lzma preset 6) of an uncompressed .npz, one file per pair",
        "checkpoint": {
            "file": "checkpoint.pt",
            "from": str(checkpoint),
            "sha256": file_sha256(out / "checkpoint.pt"),
            "bytes": ckpt_bytes,
            "step": step,
        },
        "held_out_groups": held,
        "strata": {"available": available, "packed": chosen},
        "pairs": packed,
        "stop": stop_reason,
    }
    (out / "index.json").write_text(json.dumps(index, indent=1))
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    index["size_mb"] = round(total / _MIB, 2)
    index["tree_mb"] = None if tree_mb is None else round(tree_mb, 2)
    index["travel_mb"] = None if tree_mb is None else round(tree_mb + total / _MIB, 2)
    index["build_s"] = round(time.monotonic() - t0, 1)
    (out / "index.json").write_text(json.dumps(index, indent=1))
    if total > limit:  # pragma: no cover - the budget leaves room for the index
        raise InvalidInput(f"{out}: {total / _MIB:.2f} MiB exceeds the limit {max_mb:.1f} MiB")
    return index


@dataclass
class Pack:
    """A GPU pack read back.

    Attributes:
        folder: The pack folder.
        index: Its ``index.json``.
        pairs: One :class:`jrs.training.data.TrainingPair` per crop (``key = <pair key>#c<i>``),
            images ``(e, e, e)`` float32 ``HU / 1000``, labels uint8, pre-computed regions.
        checkpoint: Path of the packed checkpoint.
    """

    folder: Path
    index: dict[str, Any]
    pairs: list[TrainingPair]
    checkpoint: Path


def load_pack(folder: Path, verify: bool = True) -> Pack:
    """Read a pack written by :func:`build_pack` (numpy and the standard library only).

    Args:
        folder: The pack folder.
        verify: Check each file's SHA-256 against the index (a truncated transfer fails here).

    Returns:
        The pack, its crops as training pairs.

    Raises:
        InvalidInput: For a missing, foreign or damaged pack (names the file).
    """
    folder = Path(folder)
    path = folder / "index.json"
    if not path.is_file():
        raise InvalidInput(
            f"{path}: no GPU pack index; make one with `python -m research.gpu.gpu_pack`"
        )
    index = json.loads(path.read_text())
    if index.get("format") != PACK_FORMAT or int(index.get("version", -1)) != PACK_VERSION:
        raise InvalidInput(f"{path}: not a {PACK_FORMAT} version {PACK_VERSION} index")
    ckpt = folder / str(index["checkpoint"]["file"])
    if not ckpt.is_file():
        raise InvalidInput(f"{ckpt}: the pack's checkpoint is missing")
    if verify and file_sha256(ckpt) != index["checkpoint"]["sha256"]:
        raise InvalidInput(f"{ckpt}: SHA-256 differs from the index (damaged or replaced)")
    pairs: list[TrainingPair] = []
    for rec in index["pairs"]:
        f = folder / str(rec["file"])
        if not f.is_file():
            raise InvalidInput(f"{f}: a packed pair is missing")
        data = f.read_bytes()
        if verify and hashlib.sha256(data).hexdigest() != rec["sha256"]:
            raise InvalidInput(f"{f}: SHA-256 differs from the index (damaged transfer?)")
        with np.load(io.BytesIO(lzma.decompress(data)), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        known = tuple(int(k) for k in rec["known"])
        for c in rec["crops"]:
            i = int(c["index"])
            fixed = arrays[f"c{i}_fixed"].astype(np.float32) / np.float32(HU_SCALE)
            prefix = f"c{i}_region_"
            regions = {
                k[len(prefix) :]: v.astype(np.int32)
                for k, v in arrays.items()
                if k.startswith(prefix)
            }
            pairs.append(
                TrainingPair(
                    key=f"{rec['key']}#c{i}",
                    fixed=fixed,
                    moving=arrays[f"c{i}_moving"].astype(np.float32) / np.float32(HU_SCALE),
                    fixed_labels=arrays[f"c{i}_fixed_labels"],
                    moving_labels=arrays[f"c{i}_moving_labels"],
                    body=np.broadcast_to(np.uint8(1), fixed.shape),
                    known=known,
                    regions=regions,
                    group=str(rec["group"]),
                )
            )
    if not pairs:
        raise InvalidInput(f"{path}: the pack holds no pair")
    return Pack(folder=folder, index=index, pairs=pairs, checkpoint=ckpt)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: build a pack, or ``--check`` the transfer size of one."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, help="the training store (data/store_v3)")
    ap.add_argument("--out", type=Path, default=Path("gpu_pack"), help="pack folder (ignored)")
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--max-mb", type=float, default=None, help="pack size limit, MiB (auto)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crop", type=int, default=None, help="crop edge, voxels (patch + 8)")
    ap.add_argument("--crops-per-pair", type=int, default=1)
    ap.add_argument(
        "--check", action="store_true", help="only report the transfer size of --out's pack"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.check:
            pack_mb = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file()) / _MIB
            tree = travelling_tree_bytes(Path.cwd())
            tree_mb = float("nan") if tree is None else tree / _MIB
            total = tree_mb + pack_mb
            fits = total <= TRAVEL_LIMIT_MB
            log.info(
                "tree %.1f MiB + pack %.1f MiB = %.1f MiB (limit %.0f): %s",
                tree_mb,
                pack_mb,
                total,
                TRAVEL_LIMIT_MB,
                "fits" if fits else "TOO BIG",
            )
            load_pack(args.out)
            return 0 if fits else 1
        if args.store is None:
            ap.error("--store is required (unless --check)")
        index = build_pack(
            args.store,
            args.out,
            checkpoint=args.checkpoint,
            max_mb=args.max_mb,
            seed=args.seed,
            crop=args.crop,
            crops_per_pair=args.crops_per_pair,
        )
    except InvalidInput as exc:
        log.error("%s", exc)
        return 2
    log.info(
        "pack %s: %d pairs (%s) of %s available, %.1f MiB (tree %s MiB, travel %s MiB), "
        "checkpoint step %d; %s; %.0f s",
        args.out,
        len(index["pairs"]),
        index["strata"]["packed"],
        index["strata"]["available"],
        index["size_mb"],
        index["tree_mb"],
        index["travel_mb"],
        index["checkpoint"]["step"],
        index["stop"],
        index["build_s"],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
