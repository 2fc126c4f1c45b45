"""Patient-specific adaptation: fine-tune a model on synthetic fractions of ONE planning scan.

METHOD.md ("Patient-specific adaptation", after Elmahdy et al., ISBI 2020): the planning CT is the
moving image, synthetic daily fractions of it made by the deformation engine
(:func:`jrs.synth.engine.synthesize_fraction`) are the fixed images, and the planning contours
warped by the known field are the fixed labels. The base model is fine-tuned with its own losses
and loss weighting (:class:`jrs.training.trainer.Trainer`, bf16 autocast on a CPU that has it, AMP
on
CUDA) for as long as a time budget allows, and the adapted weights are kept only when held-back
synthetic fractions of the same scan score at least as well as with the base model.

:func:`adapt` runs these phases, each recorded in ``<work>/state.json`` so that a process stopped
at any point (a service restart, a killed batch) continues where it was with the same work folder:

1. ``pairs``: read the planning CT + RTSTRUCT (ROI names mapped by the synonym table as the
   pipeline maps them), crop it to the organs plus `PLANNING_CROP_MM` (the engine and the
   pre-alignment then work on a quarter of the voxels), and make ``fractions`` training and
   ``val_fractions`` held-back fractions; each is pre-aligned and resampled like a re-contouring
   (:func:`jrs.inference.preprocess.prepare_pair`): training pairs on the organs + `TRAIN_BOX_MM`,
   held-back pairs on the pipeline's network box (pre-aligned planning organs +
   `VALIDATION_BOX_MM`); cached in ``<work>/pairs/``;
2. ``base_validation``: the base model's ``model.onnx`` on the held-back pairs through the
   deployed inference engine (:func:`jrs.inference.load_model`: OpenVINO bf16 on this CPU,
   ONNX Runtime CUDA on a GPU), scored per organ (DSC, MSD) on the path the model's metadata
   chooses per organ, after the pipeline's post-processing (largest components);
3. ``training``: fine-tune from the base weights until the budget (``minutes``, the whole run
   included) leaves just the time the last two phases are expected to take; ``last.pt`` is
   saved every `CHECKPOINT_S` seconds and on a stop request;
4. ``export``: the adapted network as a normal model artefact (``model.onnx`` with the parity
   check, ``metadata.json``, ``MODEL_CARD.md``, ``weights.pt``) by the injected
   :class:`ArtefactWriter` (``model_export`` sits above ``training``);
5. ``validation``: the exported model on the same held-back pairs, same engine, same scoring;
6. ``decide``: :func:`decide` keeps the adapted model only if no organ loses more than
   ``tolerance`` DSC and the mean DSC over organs rises; otherwise the base model is written to
   the output folder instead (its ``model.onnx`` unchanged) and the result says why.

The output folder is a model version folder in either case (``jrs recontour --model OUT``); its
``metadata.json`` holds an ``adaptation`` section: the base model's name, version and sha256, the
sha256 of the planning SeriesInstanceUID (no patient data), the decision and its reason, the steps,
the times per phase and the validation figures of both models. Nothing identifying the patient is
logged or written.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from jrs.core.errors import InvalidInput
from jrs.core.labels import SynonymTable
from jrs.training.adapt_base import BaseModel, resolve_base
from jrs.training.adapt_data import Planning, make_pairs, read_planning
from jrs.training.adapt_options import AdaptationInterrupted, AdaptOptions, json_safe
from jrs.training.adapt_score import Figures, decide, inference_of, score_model
from jrs.training.config import parse_config
from jrs.training.data import TrainingPair
from jrs.training.trainer import Trainer
from jrs.training.weights import (
    WEIGHTS_FILE,
    save_weights,
)

log = logging.getLogger(__name__)

#: Seconds between two training checkpoints.
CHECKPOINT_S = 60.0
#: Seconds reserved for the export (legacy exporter + parity check) before it has been timed.
EXPORT_RESERVE_S = 45.0
#: Files of the work folder.
STATE_FILE = "state.json"
PROGRESS_FILE = "progress.json"
LOCK_FILE = ".lock"
TRAIN_LOG = "adapt_log.csv"
#: Why the base stays when no fine-tuning step fitted in the budget.
NO_STEP_REASON = (
    "no fine-tuning step fitted in the time budget after making the fractions and validating the "
    "base model; the base model stays"
)
#: Version of the state file (a different version starts afresh).
STATE_VERSION = 1

__all__ = ["AdaptResult", "ArtefactWriter", "adapt", "read_progress"]


class ArtefactWriter(Protocol):
    """What the adaptation needs of the export (``jrs.model_export.export.ArtefactWriter``)."""

    def write(
        self,
        net: nn.Module,
        dest: Path,
        *,
        name: str,
        version: int,
        network: Mapping[str, Any],
        checkpoint: Mapping[str, Any],
        metrics: Mapping[str, Any] | None,
        weighting: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        """Write a model version folder at ``dest`` (absent before); return its metadata."""
        ...

    def card(self, metadata: Mapping[str, Any]) -> str:
        """The ``MODEL_CARD.md`` text of a model's metadata."""
        ...


@dataclass
class AdaptResult:
    """What :func:`adapt` produced.

    Attributes:
        out: The model version folder written.
        kept: Whether the adapted weights were kept (else the folder holds the base model).
        reason: Why (one line, organ figures included).
        metadata: The ``metadata.json`` written.
        steps: Fine-tuning steps done.
        seconds: Wall time of all attempts together.
        resumed: Whether this run continued an interrupted one (or found it finished).
    """

    out: Path
    kept: bool
    reason: str
    metadata: dict[str, Any]
    steps: int
    seconds: float
    resumed: bool = False


# ------------------------------------------------------------------------------ work folder
@dataclass
class _State:
    """The resumable state of an adaptation (``state.json``)."""

    fingerprint: str
    phase: str = "start"
    spent_s: float = 0.0
    attempts: int = 0
    step: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    base: dict[str, Any] | None = None
    adapted: dict[str, Any] | None = None
    step_s: float | None = None
    device: str = "cpu"
    precision: str = "fp32"
    threads: int = 1

    def save(self, work: Path) -> None:
        data = {"version": STATE_VERSION, **asdict(self)}
        tmp = work / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(json_safe(data), indent=2))
        tmp.replace(work / STATE_FILE)

    @classmethod
    def load(cls, work: Path, fingerprint: str) -> _State | None:
        path = work / STATE_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if data.pop("version", None) != STATE_VERSION or data.get("fingerprint") != fingerprint:
            return None
        if data.get("phase") == "done":  # its output is gone (else _done_already answered)
            return None
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@contextlib.contextmanager
def _locked(work: Path) -> Iterator[None]:
    """Hold an exclusive lock on the work folder (a second run waits for the first)."""
    work.mkdir(parents=True, exist_ok=True)
    with (work / LOCK_FILE).open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another adaptation holds this work folder; waiting for it to end")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fingerprint(planning: Planning, base: BaseModel, options: AdaptOptions, patch: int) -> str:
    what = {
        "planning": planning.series_sha256,
        "organs": list(planning.known),
        "base": base.sha256,
        "weights": base.weights_sha256,
        "fractions": options.fractions,
        "val_fractions": options.val_fractions,
        "seed": options.seed,
        "lr": options.lr,
        "patch": patch,
        "strength": options.strength,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


def _write_progress(work: Path, state: _State, budget_s: float, **extra: Any) -> None:
    data = {
        "phase": state.phase,
        "step": state.step,
        "spent_s": round(state.spent_s, 1),
        "budget_s": round(budget_s, 1),
        "step_s": state.step_s,
        "updated_at": time.time(),
        **extra,
    }
    tmp = work / (PROGRESS_FILE + ".tmp")
    tmp.write_text(json.dumps(json_safe(data)))
    tmp.replace(work / PROGRESS_FILE)


def read_progress(work: Path) -> dict[str, Any] | None:
    """The last ``progress.json`` of a work folder (phase, step, spent_s, budget_s), or None."""
    try:
        data = json.loads((Path(work) / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ------------------------------------------------------------------------------ fine-tuning
def _train_config(base: BaseModel, options: AdaptOptions, patch: int, out: Path) -> Any:

    cfg = base.weights.get("config") or {}
    weighting = dict(cfg.get("weighting") or {"name": base.weights["weighting"]["name"]})
    return parse_config(
        {
            "network": dict(base.weights["network"]),
            "weighting": weighting,
            "data": {"synthetic": {"count": 1}},
            "patch_size": patch,
            "pairs_per_batch": int(cfg.get("pairs_per_batch") or 2),
            "patches_per_pair": 1,
            "swap": bool(cfg.get("swap", True)),
            "lr": options.lr,
            "iterations": options.max_steps or 10**9,
            "steps_per_epoch": int(cfg.get("steps_per_epoch") or 200),
            "seed": options.seed,
            "checkpoint_every": 10**9,
            "log_every": 1,
            "plot_every": 10**9,
            "device": options.device,
            "amp": True,
            "precision": options.precision,
            "schedule": {"name": "constant"},
            "num_threads": options.threads,
            "tensorboard": False,
            "output_dir": str(out),
        },
        source="jrs adapt",
    )


@dataclass
class _Clock:
    """Seconds spent by this adaptation over all its attempts."""

    before: float
    t0: float = field(default_factory=time.monotonic)

    def spent(self) -> float:
        return self.before + time.monotonic() - self.t0


def _fine_tune(
    base: BaseModel,
    train_pairs: Sequence[TrainingPair],
    options: AdaptOptions,
    patch: int,
    work: Path,
    state: _State,
    clock: _Clock,
    deadline_s: float,
    should_stop: Callable[[], bool],
    budget_s: float,
) -> Any:
    """Fine-tune from the base weights (or the last checkpoint) until the deadline; the trainer."""
    config = _train_config(base, options, patch, work / "train")
    ckpt = work / "train" / "checkpoints" / "last.pt"
    resume = ckpt.is_file() and state.step > 0
    trainer = Trainer(
        config, train_pairs=list(train_pairs), val_pairs=[], resume=resume, progress=False
    )
    if not resume:
        trainer.net.load_state_dict(base.weights["model"])
        wstate = (base.weights.get("weighting") or {}).get("state") or {}
        if wstate:
            try:
                trainer.weighting.load_state_dict(wstate)
            except (RuntimeError, KeyError) as exc:
                log.warning("loss weighting state of the base not restored (%s)", exc)
    if state.phase == "trained":
        return trainer
    trainer.net.train()
    trainer.weighting.train()
    log_path = work / TRAIN_LOG
    new_log = not log_path.is_file()
    last_save = time.monotonic()
    step_s = state.step_s or 0.0
    with log_path.open("a", newline="") as fh:
        writer = csv.writer(fh)
        if new_log:
            writer.writerow(["step", "spent_s", "step_s", "loss_total"])
        while True:
            steps = trainer.step
            if options.max_steps is not None and steps >= options.max_steps:
                break
            if steps >= options.min_steps and clock.spent() + step_s > deadline_s:
                break
            if should_stop():
                state.step = trainer.step
                state.spent_s = clock.spent()
                trainer.save(ckpt)
                state.save(work)
                raise AdaptationInterrupted(f"stop requested at fine-tuning step {trainer.step}")
            t = time.perf_counter()
            row = trainer.train_step()
            dt = time.perf_counter() - t
            step_s = dt if step_s == 0.0 else 0.8 * step_s + 0.2 * dt
            writer.writerow(
                [trainer.step, f"{clock.spent():.1f}", f"{dt:.3f}", f"{row['loss_total']:.5f}"]
            )
            if time.monotonic() - last_save >= CHECKPOINT_S:
                fh.flush()
                trainer.save(ckpt)
                state.step, state.step_s, state.spent_s = trainer.step, step_s, clock.spent()
                state.save(work)
                _write_progress(work, state, budget_s)
                last_save = time.monotonic()
    trainer.save(ckpt)
    state.step, state.step_s, state.spent_s = trainer.step, step_s, clock.spent()
    state.phase = "trained"
    state.save(work)
    return trainer


# ------------------------------------------------------------------------------ the run
def _write_folder(dest: Path, fill: Callable[[Path], None]) -> None:
    """Fill a sibling temporary folder, then move it to ``dest`` (replacing it)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        fill(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_output(
    out: Path,
    kept: bool,
    candidate: Path,
    base: BaseModel,
    adaptation: Mapping[str, Any],
    writer: ArtefactWriter,
) -> dict[str, Any]:
    """Write the output model folder: the adapted candidate, or a copy of the base model.

    Either way ``metadata.json`` gets the ``adaptation`` section and the card its figures.

    Returns:
        The metadata written.
    """
    if kept:
        meta = json.loads((candidate / "metadata.json").read_text())
    else:
        meta = copy.deepcopy(base.metadata)
    meta["adaptation"] = json_safe(dict(adaptation))

    def fill(tmp: Path) -> None:
        if kept:
            for item in candidate.iterdir():
                shutil.copy2(item, tmp / item.name)
        else:  # the base model unchanged, with its weights for a later adaptation
            shutil.copy2(base.model_dir / "model.onnx", tmp / "model.onnx")
            meta["weights"] = save_weights(tmp / WEIGHTS_FILE, base.weights)
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "MODEL_CARD.md").write_text(writer.card(meta))

    _write_folder(out, fill)
    return dict(meta)


def _done_already(out: Path, fingerprint: str) -> dict[str, Any] | None:
    try:
        meta = json.loads((out / "metadata.json").read_text())
    except (OSError, ValueError):
        return None
    ada = meta.get("adaptation") if isinstance(meta, dict) else None
    if (
        isinstance(ada, dict)
        and ada.get("fingerprint") == fingerprint
        and (out / "model.onnx").is_file()
    ):
        return meta
    return None


def adapt(
    planning_ct: Path | str,
    planning_rtstruct: Path | str,
    out: Path | str,
    writer: ArtefactWriter,
    *,
    base: Path | str | None = None,
    base_weights: Path | str | None = None,
    options: AdaptOptions | None = None,
    synonyms: SynonymTable | None = None,
    work: Path | str | None = None,
    overwrite: bool = False,
    should_stop: Callable[[], bool] | None = None,
    progress: Callable[[str], None] | None = None,
) -> AdaptResult:
    """Adapt a model to one patient's planning scan and write a model folder (module docstring).

    Args:
        planning_ct: Planning CT series folder.
        planning_rtstruct: Its RTSTRUCT.
        out: Output model version folder (``jrs recontour --model OUT``).
        writer: Writes the exported model (``jrs.model_export.export.ArtefactWriter()``).
        base: Base model version folder (default: the bundled model).
        base_weights: Torch weights of the base (default: found by :func:`resolve_base`).
        options: Budget, fractions, device ... (:class:`AdaptOptions`).
        synonyms: ROI-name synonym table.
        work: Work folder (default ``<out parent>/.<out name>.adapt``); a run with the same work
            folder, planning scan, base and options continues an interrupted one.
        overwrite: Replace an existing ``out`` made from other inputs.
        should_stop: Polled between steps, pairs and phases; True checkpoints and raises
            `AdaptationInterrupted` (a later run continues).
        progress: Called with one line per phase (the command prints them).

    Returns:
        The result: kept or not, why, the metadata written.

    Raises:
        InvalidInput: Bad options, inputs, base model, or an ``out`` holding something else.
        AdaptationInterrupted: ``should_stop`` asked for it.
    """
    opts = options or AdaptOptions()
    opts.check()
    out = Path(out)
    work = Path(work) if work is not None else out.parent / f".{out.name}.adapt"
    say = progress or (lambda line: log.info("%s", line))
    t_start = time.monotonic()
    with _locked(work):
        planning = read_planning(planning_ct, planning_rtstruct, synonyms)
        base_model = resolve_base(base, base_weights)
        patch = int(opts.patch_size or base_model.weights.get("patch_size") or 64)
        fingerprint = _fingerprint(planning, base_model, opts, patch)
        done = _done_already(out, fingerprint)
        if done is not None:
            ada = done["adaptation"]
            say(f"already adapted: {out} ({'adapted' if ada.get('kept') else 'base'} model)")
            return AdaptResult(
                out,
                bool(ada.get("kept")),
                str(ada.get("reason")),
                done,
                int(ada.get("steps") or 0),
                float(ada.get("seconds") or 0.0),
                True,
            )
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise InvalidInput(
                f"{out} already holds something other than this adaptation; choose another --out "
                "or pass --overwrite"
            )
        run = _Adaptation(work, fingerprint, opts, planning, base_model, patch, should_stop, say)
        train_pairs, val_pairs = run.pairs()
        base_figs = run.base_validation(val_pairs)
        trainer = run.fine_tune(train_pairs, base_figs)
        if trainer is not None and run.state.step > 0 and run.state.phase == "trained":
            run.export(trainer, writer)
        adapted_figs = run.validate_candidate(val_pairs)
        result = run.finish(out, writer, base_figs, adapted_figs)
        log.info(
            "adaptation written to %s in %.0f s (this run %.0f s)",
            out,
            result.seconds,
            time.monotonic() - t_start,
        )
        return result


class _Adaptation:
    """One adaptation's phases on its work folder.

    Pairs, base validation, fine-tuning, export, validation of the candidate, decision: each
    phase is recorded in the state file, so that an interrupted run continues where it stopped.
    """

    def __init__(
        self,
        work: Path,
        fingerprint: str,
        opts: AdaptOptions,
        planning: Planning,
        base_model: BaseModel,
        patch: int,
        should_stop: Callable[[], bool] | None,
        say: Callable[[str], None],
    ) -> None:
        self.work, self.fingerprint, self.opts = work, fingerprint, opts
        self.planning, self.base_model, self.patch = planning, base_model, patch
        self.stop = should_stop or (lambda: False)
        self.say = say
        self.budget_s = opts.minutes * 60.0
        state = _State.load(work, fingerprint)
        self.resumed = state is not None
        if state is None:
            for child in work.iterdir():
                if child.name != LOCK_FILE:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            state = _State(fingerprint)
        else:
            say(f"continuing an interrupted adaptation (phase {state.phase}, step {state.step})")
        state.attempts += 1
        self.state = state
        self.clock = _Clock(state.spent_s)
        state.save(work)
        self.candidate = work / "candidate"
        self.organs = list(planning.known)

    def phase(self, name: str) -> None:
        """Enter a phase: record it and the time spent, and the progress file."""
        self.state.phase = name
        self.state.spent_s = self.clock.spent()
        self.state.save(self.work)
        _write_progress(self.work, self.state, self.budget_s)

    def timed(self, name: str, t0: float) -> None:
        """Add the time since ``t0`` to the phase's timing."""
        timings = self.state.timings
        timings[name] = round(timings.get(name, 0.0) + time.monotonic() - t0, 2)

    def stop_here(self) -> bool:
        """``should_stop``, recording the time spent first (the budget counts it)."""
        if not self.stop():
            return False
        self.state.spent_s = self.clock.spent()
        self.state.save(self.work)
        return True

    def pairs(self) -> tuple[list[Any], list[Any]]:
        """1. The synthetic fractions: training pairs and held-back pairs (cached on disk)."""
        t = time.monotonic()
        if self.state.phase == "start":
            self.phase("pairs")
        train_pairs, val_pairs = make_pairs(
            self.planning, self.opts, self.work / "pairs", self.stop_here
        )
        self.timed("pairs", t)
        self.say(
            f"{len(train_pairs)} + {len(val_pairs)} synthetic fractions ready "
            f"({self.state.timings['pairs']:.0f} s)"
        )
        return train_pairs, val_pairs

    def _score(self, model_dir: Path, val_pairs: list[Any]) -> Figures:
        return score_model(
            model_dir,
            val_pairs,
            self.base_model.path_choice,
            self.organs,
            device=self.opts.device,
            engine=self.opts.engine,
            should_stop=self.stop_here,
            fusion=self.base_model.metadata.get("fusion"),
        )

    def base_validation(self, val_pairs: list[Any]) -> Figures:
        """2. The base model on the held-back fractions (once per work folder)."""
        state = self.state
        if state.base is None:
            self.phase("base_validation")
            t = time.monotonic()
            state.base = self._score(self.base_model.model_dir, val_pairs).as_dict()
            self.timed("base_validation", t)
            state.save(self.work)
        base_figs = Figures.from_dict(state.base)
        self.say(
            f"base model on {len(val_pairs)} held-back fractions: mean DSC "
            f"{base_figs.mean_dsc:.4f} ({base_figs.seconds:.0f} s)"
        )
        return base_figs

    def fine_tune(self, train_pairs: list[Any], base_figs: Figures) -> Any:
        """3. Fine-tune within the budget left after the export and the candidate's scoring."""
        state = self.state
        if state.phase in ("pairs", "base_validation", "training"):
            state.phase = "training"
        reserve = 1.1 * base_figs.seconds + state.timings.get("export", EXPORT_RESERVE_S) + 5.0
        deadline = self.budget_s - reserve
        trainer = None
        t = time.monotonic()
        if state.phase in ("training", "trained"):
            self.phase(state.phase)
            trainer = _fine_tune(
                self.base_model,
                train_pairs,
                self.opts,
                self.patch,
                self.work,
                state,
                self.clock,
                deadline,
                self.stop_here,
                self.budget_s,
            )
            self.timed("training", t)
            state.device = trainer.device.type
            state.precision = (
                "amp-fp16"
                if trainer.amp
                else ("bf16" if trainer.autocast == torch.bfloat16 else "fp32")
            )
            state.threads = torch.get_num_threads()
            state.save(self.work)
        if state.phase == "trained":
            self.say(
                f"fine-tuned {state.step} steps in {state.timings.get('training', 0.0):.0f} s "
                f"({state.precision} on {state.device})"
            )
        return trainer

    def export(self, trainer: Any, writer: ArtefactWriter) -> None:
        """4. Export the fine-tuned network as a candidate model folder."""
        base_model = self.base_model
        self.phase("export")
        t = time.monotonic()
        if self.candidate.exists():
            shutil.rmtree(self.candidate)
        weighting = {
            "name": trainer.config.weighting.name,
            "state": trainer.weighting.state_dict(),
        }
        writer.write(
            trainer.net.cpu().eval(),
            self.candidate,
            name=f"{base_model.metadata.get('name', 'model')}-patient",
            version=1,
            network=dict(base_model.weights["network"]),
            checkpoint={
                # no local path in the artefact (it may name the patient's folder)
                "config": {**trainer.config.resolved(), "output_dir": "adaptation work folder"},
                "git_sha": trainer.sha,
                "step": self.state.step,
                "patch_size": self.patch,
                "tasks": list(trainer.tasks),
                "torch_version": torch.__version__,
            },
            metrics={
                "path_choice": base_model.path_choice,
                # the base's pipeline settings: the two are compared as the pipeline runs
                # each (null correction, field smoothing, network passes)
                "inference": inference_of(base_model.metadata),
                # the base model's fusion method and weights, as validated for it
                **(
                    {"fusion": base_model.metadata["fusion"]}
                    if base_model.metadata.get("fusion")
                    else {}
                ),
            },
            weighting=weighting,
        )
        self.timed("export", t)
        self.state.phase = "exported"
        self.state.save(self.work)

    def validate_candidate(self, val_pairs: list[Any]) -> Figures | None:
        """5. The candidate on the held-back fractions (None: no candidate)."""
        state = self.state
        if state.phase == "exported" and state.adapted is None:
            self.phase("exported")
            t = time.monotonic()
            state.adapted = self._score(self.candidate, val_pairs).as_dict()
            self.timed("validation", t)
            state.save(self.work)
        return Figures.from_dict(state.adapted) if state.adapted is not None else None

    def finish(
        self,
        out: Path,
        writer: ArtefactWriter,
        base_figs: Figures,
        adapted_figs: Figures | None,
    ) -> AdaptResult:
        """6. Keep the candidate or the base, write the output folder, tidy the work folder."""
        state, opts = self.state, self.opts
        if adapted_figs is not None:
            kept, reason = decide(base_figs, adapted_figs, opts.tolerance)
        else:
            kept, reason = False, NO_STEP_REASON
        seconds = self.clock.spent()
        adaptation = self._record(kept, reason, seconds, base_figs, adapted_figs)
        meta = _write_output(out, kept, self.candidate, self.base_model, adaptation, writer)
        state.phase = "done"
        state.spent_s = seconds
        state.save(self.work)
        _write_progress(self.work, state, self.budget_s, kept=kept)
        self.say(("kept the ADAPTED model: " if kept else "kept the BASE model: ") + reason)
        if not opts.keep_work:
            for child in self.work.iterdir():
                if child.name not in (LOCK_FILE, PROGRESS_FILE, STATE_FILE):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        return AdaptResult(out, kept, reason, meta, state.step, seconds, self.resumed)

    def _record(
        self,
        kept: bool,
        reason: str,
        seconds: float,
        base_figs: Figures,
        adapted_figs: Figures | None,
    ) -> dict[str, Any]:
        """The ``adaptation`` entry of the output's ``metadata.json``."""
        state, opts, base_model = self.state, self.opts, self.base_model
        steps = state.step
        steps_per_s = steps / state.timings["training"] if state.timings.get("training") else None
        return {
            "kind": "patient-specific",
            "kept": kept,
            "reason": reason,
            "fingerprint": self.fingerprint,
            "base": base_model.info(),
            "planning_series_sha256": self.planning.series_sha256,
            "organs": self.planning.organs,
            "steps": steps,
            "steps_per_s": None if steps_per_s is None else round(steps_per_s, 4),
            "seconds": round(seconds, 1),
            "budget_s": round(self.budget_s, 1),
            "attempts": state.attempts,
            "timings_s": dict(state.timings),
            "train_fractions": opts.fractions,
            "validation_fractions": opts.val_fractions,
            "seed": opts.seed,
            "lr": opts.lr,
            "patch_size": self.patch,
            "device": state.device,
            "precision": state.precision,
            "threads": state.threads,
            "validation": {
                "engine": opts.engine,
                "path_choice": base_model.path_choice,
                "tolerance": opts.tolerance,
                "base": base_figs.as_dict(),
                "adapted": adapted_figs.as_dict() if adapted_figs is not None else None,
            },
            "torch_version": torch.__version__,
            "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
