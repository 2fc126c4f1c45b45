"""Loss-weighting schemes combining the task losses (METHOD.md): equal, homoscedastic, DWA.

Each scheme is an ``nn.Module`` called with ``{task: scalar loss}`` and returning the scalar total
to back-propagate. Task names are those of :data:`jrs.training.losses.TASK_NAMES` (``"seg"``,
``"reg"``, ``"reg_dsc"``); the bending energy is a fixed-weight (0.5) part of ``"reg"`` and is
never weighted here.

Use in a training loop::

    weighting = build_weighting("homoscedastic", tasks)
    optimiser = torch.optim.RAdam([*net.parameters(), *weighting.parameters()], lr=1e-4)
    ...
    total = weighting({k: v.total for k, v in task_losses.items()})
    ...
    weighting.end_epoch()  # DWA: next epoch's weights from the epoch means (no-op otherwise)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from jrs.training.losses import TASK_NAMES

#: Names accepted by :func:`build_weighting`.
WEIGHTING_NAMES: tuple[str, ...] = ("equal", "homoscedastic", "dwa")


class LossWeighting(nn.Module):
    """Base class: a weighted sum of task losses.

    Args:
        tasks: Task names, a subset of :data:`jrs.training.losses.TASK_NAMES`.
    """

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        tasks = tuple(tasks)
        bad = [t for t in tasks if t not in TASK_NAMES]
        if not tasks or bad or len(set(tasks)) != len(tasks):
            raise ValueError(
                f"invalid task list {tasks}; choose distinct names from {TASK_NAMES} "
                "(the bending-energy weight is fixed inside 'reg' and never weighted here)"
            )
        self.tasks = tasks

    def _check(self, losses: Mapping[str, torch.Tensor]) -> None:
        if set(losses) != set(self.tasks):
            raise ValueError(f"expected losses for tasks {self.tasks}, got {sorted(losses)}")

    def weights(self) -> dict[str, float]:
        """Current effective weight of each task (for logging)."""
        raise NotImplementedError

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Combine the task losses.

        Args:
            losses: Task name -> scalar loss (every task of ``self.tasks``).

        Returns:
            Scalar total loss.
        """
        raise NotImplementedError

    def end_epoch(self, epoch_losses: Mapping[str, float] | None = None) -> None:
        """Mark the end of an epoch (used by DWA; a no-op for the other schemes)."""


class EqualWeighting(LossWeighting):
    """All weights 1: ``total = sum_i L_i``."""

    def weights(self) -> dict[str, float]:
        """Every weight is 1."""
        return dict.fromkeys(self.tasks, 1.0)

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Return ``sum_i L_i``."""
        self._check(losses)
        total = losses[self.tasks[0]]
        for t in self.tasks[1:]:
            total = total + losses[t]
        return total


class HomoscedasticWeighting(LossWeighting):
    """Homoscedastic uncertainty weighting (Kendall et al. 2018).

    ``total = sum_i exp(-s_i) L_i + s_i / 2`` with learnable ``s_i = log sigma_i^2`` initialised to
    0. The ``s_i`` are this module's parameters: **pass** ``weighting.parameters()`` **to the
    optimiser** together with the network's.

    Args:
        tasks: Task names.
    """

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.log_vars = nn.ParameterDict({t: nn.Parameter(torch.zeros(())) for t in self.tasks})

    def weights(self) -> dict[str, float]:
        """Effective weights ``exp(-s_i)``."""
        return {t: float(torch.exp(-self.log_vars[t].detach())) for t in self.tasks}

    def log_variances(self) -> dict[str, float]:
        """The learnable ``s_i = log sigma_i^2`` (for logging)."""
        return {t: float(self.log_vars[t].detach()) for t in self.tasks}

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Return ``sum_i exp(-s_i) L_i + s_i / 2``."""
        self._check(losses)
        terms = [
            torch.exp(-self.log_vars[t]) * losses[t] + 0.5 * self.log_vars[t] for t in self.tasks
        ]
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return total


class DWAWeighting(LossWeighting):
    """Dynamic weight averaging (Liu et al. 2019), updated once per epoch.

    ``w_k(t) = K exp(r_k(t-1) / T) / sum_j exp(r_j(t-1) / T)`` with
    ``r_k(t-1) = L_k(t-1) / L_k(t-2)`` the ratio of the epoch-averaged losses of the two previous
    epochs; ``w_k = 1`` during the first two epochs. ``total = sum_k w_k L_k`` (weights are
    constants, no gradient).

    The epoch averages are accumulated by :meth:`forward` (in training mode) and closed by
    :meth:`end_epoch`, or given explicitly to :meth:`end_epoch`. The history is saved in the
    module's ``state_dict``.

    Args:
        tasks: Task names (``K = len(tasks)``).
        temperature: ``T`` (the paper's 1; the original code had 2).
    """

    def __init__(self, tasks: Sequence[str], temperature: float = 1.0) -> None:
        super().__init__(tasks)
        if not temperature > 0:
            raise ValueError(f"DWA temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.history: list[dict[str, float]] = []
        self._sums: dict[str, float] = dict.fromkeys(self.tasks, 0.0)
        self._count = 0
        self._weights: dict[str, float] = dict.fromkeys(self.tasks, 1.0)

    @property
    def epoch(self) -> int:
        """Index of the current epoch (number of closed epochs)."""
        return len(self.history)

    def weights(self) -> dict[str, float]:
        """Weights of the current epoch."""
        return dict(self._weights)

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Return ``sum_k w_k L_k``; in training mode also accumulate the epoch means."""
        self._check(losses)
        if self.training:
            for t in self.tasks:
                self._sums[t] += float(losses[t].detach())
            self._count += 1
        total = self._weights[self.tasks[0]] * losses[self.tasks[0]]
        for t in self.tasks[1:]:
            total = total + self._weights[t] * losses[t]
        return total

    def end_epoch(self, epoch_losses: Mapping[str, float] | None = None) -> None:
        """Close an epoch and compute the weights of the next one.

        Args:
            epoch_losses: The epoch's mean loss per task; when ``None`` the means accumulated by
                :meth:`forward` since the last call are used.

        Raises:
            ValueError: When no losses were given or accumulated, or a mean is not positive.
        """
        if epoch_losses is None:
            if self._count == 0:
                raise ValueError("DWA end_epoch: no losses accumulated during this epoch")
            means = {t: self._sums[t] / self._count for t in self.tasks}
        else:
            if set(epoch_losses) != set(self.tasks):
                raise ValueError(
                    f"expected epoch losses for {self.tasks}, got {sorted(epoch_losses)}"
                )
            means = {t: float(epoch_losses[t]) for t in self.tasks}
        bad = {t: v for t, v in means.items() if not (v > 0 and math.isfinite(v))}
        if bad:
            raise ValueError(f"DWA needs finite positive epoch losses, got {bad}")
        self.history.append(means)
        self._sums = dict.fromkeys(self.tasks, 0.0)
        self._count = 0
        self._weights = self._compute_weights()

    def _compute_weights(self) -> dict[str, float]:
        if len(self.history) < 2:
            return dict.fromkeys(self.tasks, 1.0)
        prev, prev2 = self.history[-1], self.history[-2]
        ratios = [prev[t] / prev2[t] for t in self.tasks]
        exps = [math.exp(r / self.temperature) for r in ratios]
        k, z = len(self.tasks), sum(exps)
        return {t: k * e / z for t, e in zip(self.tasks, exps, strict=True)}

    def get_extra_state(self) -> dict[str, Any]:
        """Epoch history and running sums, for checkpoints."""
        return {
            "history": [dict(h) for h in self.history],
            "sums": dict(self._sums),
            "count": self._count,
            "temperature": self.temperature,
        }

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` saved."""
        self.history = [dict(h) for h in state["history"]]
        self._sums = dict(state["sums"])
        self._count = int(state["count"])
        self.temperature = float(state["temperature"])
        self._weights = self._compute_weights()


def build_weighting(name: str, tasks: Sequence[str], **kwargs: Any) -> LossWeighting:
    """Build a loss-weighting scheme by name.

    Args:
        name: ``"equal"``, ``"homoscedastic"`` or ``"dwa"``.
        tasks: Task names, e.g. ``jrs.training.losses.TASKS_BY_NETWORK[network_name]``.
        **kwargs: Scheme options (``temperature`` for DWA).

    Returns:
        The weighting module (give its ``parameters()`` to the optimiser).
    """
    key = name.lower()
    if key == "equal":
        return EqualWeighting(tasks, **kwargs)
    if key == "homoscedastic":
        return HomoscedasticWeighting(tasks, **kwargs)
    if key == "dwa":
        return DWAWeighting(tasks, **kwargs)
    raise ValueError(f"unknown loss weighting {name!r}; expected one of {WEIGHTING_NAMES}")
