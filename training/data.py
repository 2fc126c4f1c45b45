"""Training data: planning/daily pairs prepared once, cached, and sampled as 3-D patches.

A dataset is any folder of patients in the ``jrs phantom`` layout::

    ROOT/<patient>/planning/{ct/, rtstruct.dcm}
    ROOT/<patient>/fraction_<k>/{ct/, rtstruct.dcm[, true_dvf.mha]}

so a clinic can point the same command at its own converted archive. Each (planning, fraction)
pair is pre-aligned and resampled to the 1 mm network grid by
`jrs.inference.preprocess.prepare_pair` (the function the re-contouring pipeline uses), and cached
on disk as ``.npz``. Patches of n^3 voxels
are drawn with centres balanced over three regions (targets: prostate + seminal vesicles; organs
at risk: bladder + rectum; torso: the body), uniformly inside the chosen region; volumes are padded
so that patches may hang over the edge. Each drawn pair is also used swapped (fixed <-> moving,
labels swapped too), as METHOD.md prescribes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt

from jrs.core.errors import InvalidInput
from jrs.core.labels import (
    BLADDER,
    PROSTATE,
    RECTUM,
    SEMINAL_VESICLES,
    SynonymTable,
    label_map_from_masks,
)
from jrs.inference.preprocess import prepare_pair
from jrs.io.ct import read_ct_series
from jrs.io.rtstruct import read_rtstruct, rtstruct_to_masks
from jrs.synth import generate_fraction, generate_patient

if TYPE_CHECKING:  # SimpleITK is imported only where DICOM pairs are prepared (lazily, below)
    from jrs.core.geometry import Volume
    from jrs.inference.preprocess import PreparedPair

log = logging.getLogger(__name__)

CACHE_VERSION = 1
AIR = -1.0  # normalised intensity of air (-1000 HU)


@dataclass(frozen=True)
class PairRecord:
    """Where the files of one planning/daily pair are.

    Attributes:
        patient: patient folder name.
        fraction: fraction folder name.
        planning_ct: folder of the planning CT series.
        planning_rtstruct: planning RTSTRUCT file.
        daily_ct: folder of the daily CT series.
        daily_rtstruct: daily RTSTRUCT file (ground truth contours).
    """

    patient: str
    fraction: str
    planning_ct: Path
    planning_rtstruct: Path
    daily_ct: Path
    daily_rtstruct: Path

    @property
    def key(self) -> str:
        """A stable cache key for this pair."""
        digest = hashlib.sha1(
            f"{self.planning_ct.resolve()}|{self.daily_ct.resolve()}".encode()
        ).hexdigest()[:12]
        return f"{self.patient}_{self.fraction}_{digest}"


def discover_pairs(root: Path | str, patients: Sequence[str] | None = None) -> list[PairRecord]:
    """List every (planning, fraction) pair of a dataset folder in the ``jrs phantom`` layout.

    Args:
        root: the dataset folder.
        patients: restrict to these patient folder names.

    Returns:
        Pairs sorted by patient then fraction number.

    Raises:
        InvalidInput: when the folder holds no complete pair (names what is missing).
    """
    root = Path(root)
    if not root.is_dir():
        raise InvalidInput(f"{root}: dataset folder does not exist")
    pairs: list[PairRecord] = []
    for pdir in sorted(p for p in root.iterdir() if p.is_dir()):
        if patients is not None and pdir.name not in patients:
            continue
        planning = pdir / "planning"
        if not (planning / "ct").is_dir() or not (planning / "rtstruct.dcm").is_file():
            log.warning("%s: no planning/ct or planning/rtstruct.dcm, skipped", pdir.name)
            continue
        fractions = sorted(
            (f for f in pdir.glob("fraction_*") if f.is_dir()),
            key=lambda f: int(re.sub(r"\D", "", f.name) or 0),
        )
        for fdir in fractions:
            if not (fdir / "ct").is_dir() or not (fdir / "rtstruct.dcm").is_file():
                log.warning("%s/%s: no ct/ or rtstruct.dcm, skipped", pdir.name, fdir.name)
                continue
            pairs.append(
                PairRecord(
                    patient=pdir.name,
                    fraction=fdir.name,
                    planning_ct=planning / "ct",
                    planning_rtstruct=planning / "rtstruct.dcm",
                    daily_ct=fdir / "ct",
                    daily_rtstruct=fdir / "rtstruct.dcm",
                )
            )
    if not pairs:
        raise InvalidInput(
            f"{root}: no planning/fraction pair found; expected <patient>/planning/{{ct/,"
            "rtstruct.dcm}} and <patient>/fraction_<k>/{ct/,rtstruct.dcm} (see `jrs phantom`)"
        )
    return pairs


def read_labelled_ct(
    ct_dir: Path, rtstruct: Path, synonyms: SynonymTable | None = None
) -> tuple[Volume, Volume]:
    """Read a CT series and its RTSTRUCT as (HU volume, label map 0..4 volume)."""
    series = read_ct_series(ct_dir)
    masks = rtstruct_to_masks(read_rtstruct(rtstruct), series)
    labels, _ = label_map_from_masks({k: v.array for k, v in masks.items()}, synonyms)
    return series.volume, series.volume.with_array(labels)


@dataclass
class TrainingPair:
    """The arrays of one prepared pair (1 mm grid), as cached.

    Attributes:
        key: cache key / name.
        fixed: (nz, ny, nx) float32 normalised daily CT.
        moving: (nz, ny, nx) float32 normalised pre-aligned planning CT.
        fixed_labels: (nz, ny, nx) uint8 daily labels.
        moving_labels: (nz, ny, nx) uint8 pre-aligned planning labels.
        body: (nz, ny, nx) uint8 daily body mask.
        known: label ids delineated in this pair (a scan without seminal vesicles: (1, 2, 4));
            the Dice terms of the other organs are masked out for its samples.
        regions: pre-computed sampling regions (see `jrs.training.store.compute_regions`), or None
            to compute them from the arrays.
        group: the patient the pair belongs to (pairs of one patient share it).
    """

    key: str
    fixed: npt.NDArray[np.float32]
    moving: npt.NDArray[np.float32]
    fixed_labels: npt.NDArray[np.uint8]
    moving_labels: npt.NDArray[np.uint8]
    body: npt.NDArray[np.uint8]
    known: tuple[int, ...] = (BLADDER, RECTUM, SEMINAL_VESICLES, PROSTATE)
    regions: dict[str, npt.NDArray[np.int32]] | None = None
    group: str = ""

    @classmethod
    def from_prepared(cls, key: str, pair: PreparedPair) -> TrainingPair:
        """Keep the arrays of a `PreparedPair` that has daily labels."""
        if pair.fixed_labels is None:
            raise InvalidInput(f"{key}: training needs daily labels (ground-truth contours)")
        return cls(key, pair.fixed, pair.moving, pair.fixed_labels, pair.moving_labels, pair.body)

    def save(self, path: Path) -> None:
        """Write to an ``.npz`` (images as float16: 0.5 HU resolution after scaling)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(
            tmp,
            version=CACHE_VERSION,
            fixed=self.fixed.astype(np.float16),
            moving=self.moving.astype(np.float16),
            fixed_labels=self.fixed_labels,
            moving_labels=self.moving_labels,
            body=self.body,
        )
        tmp.replace(path)

    @classmethod
    def load(cls, key: str, path: Path) -> TrainingPair:
        """Read a cached pair."""
        with np.load(path) as z:
            if int(z["version"]) != CACHE_VERSION:
                raise InvalidInput(f"{path}: cache version {int(z['version'])} is stale")
            return cls(
                key,
                z["fixed"].astype(np.float32),
                z["moving"].astype(np.float32),
                z["fixed_labels"],
                z["moving_labels"],
                z["body"],
            )


def load_pair(
    record: PairRecord, cache_dir: Path | None, synonyms: SynonymTable | None = None
) -> TrainingPair:
    """Prepare a pair from DICOM, or load it from the cache when present."""
    path = cache_dir / f"{record.key}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            return TrainingPair.load(record.key, path)
        except (OSError, ValueError, KeyError, InvalidInput) as exc:
            log.warning("cache %s unreadable (%s); preparing again", path.name, exc)

    daily_ct, daily_labels = read_labelled_ct(record.daily_ct, record.daily_rtstruct, synonyms)
    planning_ct, planning_labels = read_labelled_ct(
        record.planning_ct, record.planning_rtstruct, synonyms
    )
    prepared = prepare_pair(daily_ct, planning_ct, planning_labels, daily_labels=daily_labels)
    pair = TrainingPair.from_prepared(record.key, prepared)
    if path is not None:
        pair.save(path)
    return pair


def phantom_pair(patient_seed: int, fraction: int = 1) -> TrainingPair:
    """Generate a phantom pair in memory (no DICOM round trip): the on-the-fly data option."""
    patient = generate_patient(patient_seed)
    frac = generate_fraction(patient, fraction)
    prepared = prepare_pair(frac.ct, patient.ct, patient.labels, daily_labels=frac.labels)
    return TrainingPair.from_prepared(f"phantom{patient_seed}_f{fraction}", prepared)


REGIONS: dict[str, tuple[int, ...]] = {
    "targets": (PROSTATE, SEMINAL_VESICLES),
    "organs_at_risk": (BLADDER, RECTUM),
}
#: Voxel stride of the stored region lists per region (z, y, x alike).
REGION_STRIDE: dict[str, int] = {"targets": 2, "organs_at_risk": 3, "torso": 4}


@dataclass
class PatchBatch:
    """A batch of patches, channels-first, numpy (the trainer turns them into tensors).

    Attributes:
        fixed: (B, 1, n, n, n) float32 normalised fixed images.
        moving: (B, 1, n, n, n) float32 normalised moving images.
        fixed_labels: (B, 1, n, n, n) uint8 fixed labels.
        moving_labels: (B, 1, n, n, n) uint8 moving labels.
        class_mask: (B, 5) float32, 1 where a class is delineated in the sample (None: all).
        seg_valid: (B,) bool, False for domain-randomised samples whose labels are not organs
            (None: all valid).
        identity: (B,) bool, True for identity samples (same image twice, zero field).
    """

    fixed: npt.NDArray[np.float32]
    moving: npt.NDArray[np.float32]
    fixed_labels: npt.NDArray[np.uint8]
    moving_labels: npt.NDArray[np.uint8]
    class_mask: npt.NDArray[np.float32] | None = None
    seg_valid: npt.NDArray[np.bool_] | None = None
    identity: npt.NDArray[np.bool_] | None = None


class PatchSampler:
    """Region-balanced n^3 patch sampling from prepared pairs, with swapped copies.

    Args:
        pairs: the prepared pairs.
        patch_size: n, edge of the cubic input patch (voxels).
        pairs_per_batch: distinct pairs per batch (METHOD.md: 2).
        patches_per_pair: patches drawn from each chosen pair.
        swap: also add each patch with fixed <-> moving swapped (doubles the batch).
        seed: random seed (sampling is reproducible from it).
        identity_share: probability that a drawn slot is an identity slot: its samples are the
            pair's fixed image twice and (as the "swapped" copy) its moving image twice, with
            their labels, i.e. the same scan twice with a zero true field.
        synthmorph_share: probability that a slot is a domain-randomised pair
            (`jrs.training.synthmorph`) instead of a stored pair: random label-map shapes with
            random intensities and a random smooth field; its labels train the registration
            Dice only.
    """

    def __init__(
        self,
        pairs: Sequence[TrainingPair],
        patch_size: int = 96,
        pairs_per_batch: int = 2,
        patches_per_pair: int = 1,
        swap: bool = True,
        seed: int = 0,
        identity_share: float = 0.0,
        synthmorph_share: float = 0.0,
    ) -> None:
        if not pairs:
            raise InvalidInput("PatchSampler needs at least one training pair")
        for name, v in (("identity_share", identity_share), ("synthmorph_share", synthmorph_share)):
            if not 0.0 <= v <= 1.0:
                raise InvalidInput(f"{name} must lie in [0, 1], got {v}")
        self.pairs = list(pairs)
        self.n = int(patch_size)
        self.pairs_per_batch = pairs_per_batch
        self.patches_per_pair = patches_per_pair
        self.swap = swap
        self.identity_share = float(identity_share)
        self.synthmorph_share = float(synthmorph_share)
        self.rng = np.random.default_rng(seed)
        self._regions = [
            p.regions if p.regions is not None else self._region_voxels(p) for p in self.pairs
        ]
        self._jitter = [p.regions is not None for p in self.pairs]

    @staticmethod
    def _region_voxels(pair: TrainingPair) -> dict[str, npt.NDArray[np.int32]]:
        out: dict[str, npt.NDArray[np.int32]] = {}
        for name, labs in REGIONS.items():
            idx = np.argwhere(np.isin(pair.fixed_labels, labs)).astype(np.int32)
            if idx.size:
                out[name] = idx
        torso = np.argwhere(pair.body > 0).astype(np.int32)
        out["torso"] = (
            torso if torso.size else np.argwhere(np.ones_like(pair.body)).astype(np.int32)
        )
        return out

    @property
    def batch_size(self) -> int:
        """Samples per batch."""
        return self.pairs_per_batch * self.patches_per_pair * (2 if self.swap else 1)

    def state(self) -> dict[str, object]:
        """The random generator state (for bit-for-bit resume)."""
        return dict(self.rng.bit_generator.state)

    def set_state(self, state: dict[str, object]) -> None:
        """Restore a random generator state saved by `state`."""
        self.rng.bit_generator.state = state

    def _centre(self, pair_idx: int) -> npt.NDArray[np.int64]:
        regions = self._regions[pair_idx]
        names = sorted(regions)
        name = names[int(self.rng.integers(len(names)))]
        vox = regions[name]
        centre = vox[int(self.rng.integers(len(vox)))].astype(np.int64)
        if self._jitter[pair_idx]:  # stored lists are sub-sampled: spread over the stride
            centre = centre + self.rng.integers(0, REGION_STRIDE[name], size=3)
        return centre

    def _crop(self, arr: np.ndarray, centre: npt.NDArray[np.int64], fill: float) -> np.ndarray:
        n = self.n
        start = centre - n // 2
        out = np.full((n, n, n), fill, dtype=arr.dtype)
        src_lo = np.maximum(start, 0)
        src_hi = np.minimum(start + n, arr.shape)
        dst_lo = src_lo - start
        dst_hi = dst_lo + (src_hi - src_lo)
        if np.all(src_hi > src_lo):
            out[dst_lo[0] : dst_hi[0], dst_lo[1] : dst_hi[1], dst_lo[2] : dst_hi[2]] = arr[
                src_lo[0] : src_hi[0], src_lo[1] : src_hi[1], src_lo[2] : src_hi[2]
            ]
        return out

    def sample(self) -> PatchBatch:
        """Draw one batch."""
        fixed: list[np.ndarray] = []
        moving: list[np.ndarray] = []
        fl: list[np.ndarray] = []
        ml: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        seg_ok: list[bool] = []
        ident: list[bool] = []

        def add(
            f: np.ndarray,
            m: np.ndarray,
            a: np.ndarray,
            b: np.ndarray,
            mask: np.ndarray,
            seg: bool,
            is_identity: bool,
        ) -> None:
            fixed.append(f)
            moving.append(m)
            fl.append(a)
            ml.append(b)
            masks.append(mask)
            seg_ok.append(seg)
            ident.append(is_identity)

        chosen = self.rng.choice(
            len(self.pairs),
            size=self.pairs_per_batch,
            replace=len(self.pairs) < self.pairs_per_batch,
        )
        all_known = np.ones(5, np.float32)
        for pi in chosen:
            pair = self.pairs[int(pi)]
            known = np.zeros(5, np.float32)
            known[0] = 1.0
            known[list(pair.known)] = 1.0
            for _ in range(self.patches_per_pair):
                u = (
                    float(self.rng.random())
                    if (self.identity_share or self.synthmorph_share)
                    else 1.0
                )
                if u < self.synthmorph_share:
                    from jrs.training.synthmorph import synthmorph_patch

                    f, m, a, b = synthmorph_patch(self.n, self.rng)
                    add(f, m, a, b, all_known, False, False)
                    if self.swap:
                        add(m, f, b, a, all_known, False, False)
                    continue
                c = self._centre(int(pi))
                f = self._crop(pair.fixed, c, AIR)
                a = self._crop(pair.fixed_labels, c, 0)
                if u < self.synthmorph_share + self.identity_share:
                    add(f, f, a, a, known, True, True)
                    if self.swap:
                        m = self._crop(pair.moving, c, AIR)
                        b = self._crop(pair.moving_labels, c, 0)
                        add(m, m, b, b, known, True, True)
                    continue
                m = self._crop(pair.moving, c, AIR)
                b = self._crop(pair.moving_labels, c, 0)
                add(f, m, a, b, known, True, False)
                if self.swap:
                    add(m, f, b, a, known, True, False)
        return PatchBatch(
            fixed=np.stack(fixed)[:, None],
            moving=np.stack(moving)[:, None],
            fixed_labels=np.stack(fl)[:, None],
            moving_labels=np.stack(ml)[:, None],
            class_mask=np.stack(masks),
            seg_valid=np.asarray(seg_ok, bool),
            identity=np.asarray(ident, bool),
        )

    def __iter__(self) -> Iterator[PatchBatch]:
        while True:
            yield self.sample()


def batch_seed(seed: int, rank: int, index: int) -> np.random.SeedSequence:
    """The seed of batch ``index`` of process ``rank`` in a run seeded ``seed``.

    Args:
        seed: The run's seed (any integer; taken modulo 2**64).
        rank: The process's rank (0 for a single process).
        index: The batch's index in the run (the 0-based step it is drawn for).

    Returns:
        A ``SeedSequence`` keyed by the three numbers.
    """
    return np.random.SeedSequence([int(seed) % 2**64, int(rank), int(index)])


class _KeyedDraws:
    """A map-style dataset for ``torch.utils.data.DataLoader``: item ``k`` is batch ``k``."""

    def __init__(self, sampler: KeyedPatchSampler) -> None:
        self.sampler = sampler

    def __getitem__(self, index: int) -> PatchBatch:
        return self.sampler.draw(int(index))


class _From:
    """The batch indices ``start, start + 1, ...`` (the loader's endless index sampler)."""

    def __init__(self, start: int) -> None:
        self.start = int(start)

    def __iter__(self) -> Iterator[int]:
        k = self.start
        while True:
            yield k
            k += 1


def _as_is(batch: Any) -> Any:
    """The loader's collate function: a batch passes as drawn (``batch_size=None``)."""
    return batch


def _one_thread(_worker_id: int) -> None:
    """Loader worker start: one torch thread (the workers only crop numpy arrays)."""
    import torch

    torch.set_num_threads(1)


class KeyedPatchSampler(PatchSampler):
    """A :class:`PatchSampler` whose batch ``k`` depends only on ``(seed, rank, k)``.

    Batch ``k`` is drawn by the region-balanced sampling of :class:`PatchSampler` from a generator
    seeded by :func:`batch_seed` ``(seed, rank, k)``, so the sequence of batches is the same
    whether the batches are drawn in this process (``workers=0``) or by ``workers`` loader
    processes (a ``torch.utils.data.DataLoader`` that keeps the order), for any number of
    workers; the state of the sampler is the index of the next batch, and a resume continues
    bit for bit with any worker count. Each process of a distributed run draws its own stream
    (its ``rank``); rank 0's stream is that of a single-process run with the same seed.

    A checkpoint written before keyed sampling holds the state of :class:`PatchSampler`'s one
    continuous generator; :meth:`set_state` continues that stream in this process (``workers=0``:
    the batches the sampler always drew) or, with workers, switches to keyed batches from the
    checkpoint's step on (with a warning: those are not the batches the stream would have drawn).

    Args:
        pairs: The prepared pairs.
        seed: The run's seed.
        rank: The process's rank in a distributed run (0: single process).
        workers: Loader processes drawing ahead of the training step (0: draw in this process).
        prefetch: Batches each worker draws ahead.
        **kwargs: The other :class:`PatchSampler` arguments (patch size, pairs per batch, ...).
    """

    SCHEME = "keyed"

    def __init__(
        self,
        pairs: Sequence[TrainingPair],
        *,
        seed: int,
        rank: int = 0,
        workers: int = 0,
        prefetch: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(pairs, seed=seed, **kwargs)
        if workers < 0 or prefetch < 1:
            raise InvalidInput(f"workers must be >= 0 and prefetch >= 1, got {workers}, {prefetch}")
        self.seed = int(seed)
        self.rank = int(rank)
        self.workers = int(workers)
        self.prefetch = int(prefetch)
        self.next = 0
        self.stream = False  # continuing the one generator of a checkpoint written before keying
        self._it: Iterator[PatchBatch] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_it"] = None  # a loader does not travel to its own workers
        return state

    def draw(self, index: int) -> PatchBatch:
        """Batch ``index`` of this rank (the same in any process)."""
        self.rng = np.random.default_rng(batch_seed(self.seed, self.rank, index))
        return super().sample()

    def sample(self) -> PatchBatch:
        """The next batch: drawn here, or taken from the loader workers."""
        if self.stream:
            return super().sample()
        if self.workers == 0:
            batch = self.draw(self.next)
        else:
            if self._it is None:
                self._it = self._start(self.next)
            batch = next(self._it)
        self.next += 1
        return batch

    def _start(self, start: int) -> Iterator[PatchBatch]:
        import torch

        loader = torch.utils.data.DataLoader(
            cast(Any, _KeyedDraws(self)),
            batch_size=None,
            sampler=cast(Any, _From(start)),
            num_workers=self.workers,
            # fork (torch's default on Linux) shares the pairs without copying them; a process
            # that has loaded fork-unsafe libraries (a test run, a notebook) sets
            # JRS_LOADER_START_METHOD=forkserver or spawn (the pairs are then pickled to each
            # worker): the batches are the same either way
            multiprocessing_context=os.environ.get("JRS_LOADER_START_METHOD") or None,
            collate_fn=_as_is,
            worker_init_fn=_one_thread,
            prefetch_factor=self.prefetch,
            # the workers' own torch seeds come from this generator, not the process's
            generator=torch.Generator().manual_seed(self.seed % 2**63),
        )
        return iter(loader)

    def close(self) -> None:
        """Stop the loader workers (a later :meth:`sample` starts them again where it left)."""
        self._it = None

    def state(self) -> dict[str, Any]:
        """``{"scheme": "keyed", "seed": ..., "next": ...}`` (a continued stream: its generator)."""
        if self.stream:
            return super().state()
        return {"scheme": self.SCHEME, "seed": self.seed, "next": self.next}

    def set_state(self, state: dict[str, Any], step: int | None = None) -> None:
        """Continue from a saved state.

        Args:
            state: What :meth:`state` returned, or the generator state of a plain
                :class:`PatchSampler` (a checkpoint written before keyed sampling).
            step: The checkpoint's step: where keyed batches start when a plain generator state
                cannot be continued here (loader workers); default 0.

        Raises:
            InvalidInput: For a state of neither kind.
        """
        self.close()
        if state.get("scheme") == self.SCHEME:
            self.stream = False
            self.seed = int(state["seed"])
            self.next = int(state["next"])
        elif "bit_generator" in state:
            if self.workers == 0:
                self.stream = True
                super().set_state(state)
            else:
                self.stream = False
                self.next = int(step or 0)
                log.warning(
                    "the checkpoint's sampler is one generator (written before keyed sampling), "
                    "which loader workers cannot continue: batches keyed by (seed %d, rank %d, "
                    "step) from step %d on, not those the generator would have drawn",
                    self.seed,
                    self.rank,
                    self.next,
                )
        else:
            raise InvalidInput(f"unknown sampler state (keys {sorted(state)})")
