"""Start a new phase of a training campaign: a changed recipe from the run's latest checkpoint.

Run as::

    python -m jrs.training.phase --config training/configs/crossstitch_v3.yaml [--run-dir RUN]

``jrs train --resume`` refuses a checkpoint whose network was built with other constructor
overrides than the config asks for, because the weights would then compute another function.
This module rewrites ``RUN/checkpoints/last.pt`` for the config's recipe so that the campaign
goes on with it (the previous checkpoint is kept as ``last_before_phase_step<N>.pt``):

* allowed changes: the DVF heads' output scale (``network.overrides.dvf_scale``) and the loss
  options (``losses``); every other difference in the network (name, channels, inputs) is
  refused, because the trained weights do not fit another architecture;
* a new DVF scale is applied function-preservingly: each DVF head's convolution is divided by
  ``new / old`` so that the network's output is unchanged at the switch, and the RAdam moments
  of those parameters are rescaled to the new parametrisation (first moment by ``new / old``,
  second by its square), so that the optimiser continues where it stood; from then on every
  step moves the field ``new / old`` times as far as before;
* kept: step, epoch, optimiser, lr schedule, loss weighting, sampler and random states. The
  resume after the switch is bit for bit like any other; the switch itself changes the recipe;
* appended: a ``provenance`` entry (``kind: phase``) with the step and the changes. The trainer
  carries it into every later checkpoint and the model card lists it.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from jrs.core.errors import InvalidInput
from jrs.training.config import LossConfig, load_config
from jrs.training.networks import _DEFAULTS, build

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "jrs-train-checkpoint"
#: Network overrides a phase may change (the weights stay valid for them).
CHANGEABLE_OVERRIDES: tuple[str, ...] = ("dvf_scale",)

__all__ = ["CHANGEABLE_OVERRIDES", "network_overrides", "rescale_dvf_heads", "start_phase"]


def _plain(value: Any) -> Any:
    """JSON-normalised copy (tuples -> lists) for comparing configurations."""
    return json.loads(json.dumps(value))


def network_overrides(name: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The full constructor arguments of a network: its defaults merged with ``overrides``.

    Args:
        name: Network name (see :func:`jrs.training.networks.build`).
        overrides: Constructor overrides of a config or checkpoint.

    Returns:
        JSON-normalised ``{argument: value}`` for every constructor argument.
    """
    return _plain({**_DEFAULTS[name.lower()], **dict(overrides)})


def rescale_dvf_heads(ckpt: dict[str, Any], factor: float) -> list[str]:
    """Divide the DVF heads' weights by ``factor``; rescale their RAdam moments to match.

    With the heads' output scale multiplied by ``factor`` at the same time, the network computes
    the same function as before.

    Args:
        ckpt: A training checkpoint (changed in place): ``model`` and ``optimizer`` entries.
        factor: ``new_scale / old_scale`` (> 0).

    Returns:
        The names of the rescaled parameters.

    Raises:
        InvalidInput: When the checkpoint has no DVF heads or its optimiser state does not list
            its parameters in the network's order.
    """
    if not factor > 0:
        raise InvalidInput(f"DVF scale factor must be > 0, got {factor}")
    net = build(ckpt["network"]["name"], **dict(ckpt["network"].get("overrides") or {}))
    names = [n for n, _ in net.named_parameters()]
    heads = [n for n in names if n.startswith("dvf_heads.")]
    if not heads:
        raise InvalidInput(f"network {ckpt['network']['name']!r} has no DVF heads to rescale")
    opt = ckpt["optimizer"]
    ids = [i for group in opt["param_groups"] for i in group["params"]]
    if len(ids) < len(names):
        raise InvalidInput("optimiser state lists fewer parameters than the network has")
    model = ckpt["model"]
    for name in heads:
        model[name] = model[name] / factor
        state = opt["state"].get(ids[names.index(name)])
        if state:
            if "exp_avg" in state:
                state["exp_avg"] = state["exp_avg"] * factor
            if "exp_avg_sq" in state:
                state["exp_avg_sq"] = state["exp_avg_sq"] * factor**2
    return heads


def start_phase(
    ckpt: Mapping[str, Any], config: Any, *, source: str = ""
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A copy of ``ckpt`` that ``jrs train --resume`` continues with ``config``'s recipe.

    Args:
        ckpt: A jrs training checkpoint (loaded with ``map_location="cpu"``).
        config: The :class:`~training.config.TrainConfig` of the new phase.
        source: What the checkpoint was read from (for messages and the provenance).

    Returns:
        ``(checkpoint, changes)``: the checkpoint to save as ``last.pt`` and
        ``{setting: [old, new]}`` of what changed.

    Raises:
        InvalidInput: For anything but a jrs training checkpoint, for a change the trained
            weights do not survive, or when nothing changes.
    """
    where = source or "checkpoint"
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InvalidInput(f"{where}: not a jrs training checkpoint")
    name = str(ckpt["network"]["name"])
    if name != config.network.name:
        raise InvalidInput(
            f"{where}: network {name!r}; the config asks for {config.network.name!r}, whose "
            "weights are not these (a phase may change only "
            f"{', '.join(CHANGEABLE_OVERRIDES)} and the losses)"
        )
    old = network_overrides(name, ckpt["network"].get("overrides") or {})
    new = network_overrides(name, config.network.overrides)
    changes: dict[str, Any] = {}
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key not in CHANGEABLE_OVERRIDES:
            raise InvalidInput(
                f"{where}: network.overrides.{key} {old.get(key)!r} -> {new.get(key)!r} would "
                "need other weights; a phase may change only "
                f"{', '.join(CHANGEABLE_OVERRIDES)} and the losses"
            )
        changes[f"network.overrides.{key}"] = [old.get(key), new.get(key)]

    defaults = _plain(LossConfig().model_dump(mode="json"))
    old_losses = {**defaults, **_plain((ckpt.get("config") or {}).get("losses") or {})}
    new_losses = _plain(config.losses.model_dump(mode="json"))
    for key in sorted(new_losses):
        if old_losses.get(key) != new_losses[key]:
            changes[f"losses.{key}"] = [old_losses.get(key), new_losses[key]]
    if not changes:
        raise InvalidInput(f"{where}: the config changes nothing the checkpoint was trained with")
    out = copy.deepcopy(dict(ckpt))
    if "network.overrides.dvf_scale" in changes:
        before, after = changes["network.overrides.dvf_scale"]
        rescale_dvf_heads(out, float(after) / float(before))
    out["network"] = {"name": name, "overrides": _plain(dict(config.network.overrides))}
    out["config"] = config.resolved()
    out["provenance"] = [
        *(dict(p) for p in out.get("provenance", [])),
        {
            "kind": "phase",
            "from": source,
            "step": int(out["step"]),
            "changes": changes,
            "function_preserving": True,
            "note": "recipe changed at this step; optimiser, schedule, sampler and random "
            "states continue",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    ]
    return out, changes


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m jrs.training.phase", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--config", type=Path, required=True, help="YAML of the new phase")
    parser.add_argument("--run-dir", type=Path, help="run folder (default: the config's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(args.config)
    run = args.run_dir or Path(config.output_dir)
    last = run / "checkpoints" / "last.pt"
    if not last.is_file():
        raise InvalidInput(f"{last}: no checkpoint to start a phase from")
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    out, changes = start_phase(ckpt, config, source=str(last))
    keep = last.with_name(f"last_before_phase_step{int(ckpt['step'])}.pt")
    shutil.copy2(last, keep)
    tmp = last.with_suffix(".tmp")
    torch.save(out, tmp)
    tmp.replace(last)
    for key, (a, b) in changes.items():
        log.info("step %d: %s %r -> %r", int(ckpt["step"]), key, a, b)
    log.info("wrote %s (previous kept as %s); continue with jrs train --resume", last, keep.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
