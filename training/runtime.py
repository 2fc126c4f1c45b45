"""Where and how a training process runs: device, precision, seeds, the torchrun process group."""

from __future__ import annotations

import datetime
import logging
import os
import random
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from jrs.core.errors import InvalidInput

log = logging.getLogger(__name__)


#: How long a rank waits for the others at a collective (rank 0 validates while they wait).
DISTRIBUTED_TIMEOUT = datetime.timedelta(hours=2)


def git_sha() -> str:
    """The current git commit of the source tree, or ``"unknown"`` outside a repository."""
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = res.stdout.strip()
    return sha if res.returncode == 0 and sha else "unknown"


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX-BF16 or AVX512-BF16 in /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(device: torch.device, amp: bool, precision: str) -> torch.dtype | None:
    """The autocast dtype of the network's forward pass, or ``None`` for plain fp32.

    CUDA: fp16 when ``amp``. CPU: bf16 for ``precision="bf16"``, or for ``"auto"`` on a CPU with
    native bf16 (:func:`cpu_supports_bf16`).
    """
    if device.type == "cuda":
        return torch.float16 if amp else None
    if precision == "bf16" or (precision == "auto" and cpu_supports_bf16()):
        return torch.bfloat16
    return None


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """The torch device of a device setting.

    Args:
        name: ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        local_rank: The process's GPU slot on its machine in a distributed run (``LOCAL_RANK``):
            ``auto`` and ``cuda`` then mean ``cuda:<local_rank>``.

    Returns:
        The device.

    Raises:
        InvalidInput: For CUDA without a GPU, a GPU index the machine does not have, or
            ``cuda:N`` in a distributed run (every process would share one GPU).
    """
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda") and not name.startswith("cuda:"):
        raise InvalidInput(f"device {name!r} unknown; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise InvalidInput(f"device {name!r} requested but no CUDA GPU is available; use cpu")
    if name.startswith("cuda:"):
        if local_rank is not None:
            raise InvalidInput(
                f"device {name!r} in a distributed run would put every process on one GPU; use "
                "cuda or auto (each process takes cuda:LOCAL_RANK; choose the GPUs with "
                "CUDA_VISIBLE_DEVICES)"
            )
        index = int(name.split(":", 1)[1])
    elif local_rank is not None:
        index = local_rank
    else:
        return torch.device("cuda")
    count = torch.cuda.device_count()
    if index >= count:
        raise InvalidInput(f"device cuda:{index} requested but this machine has {count} GPU(s)")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process stands in a ``torchrun`` launch.

    Attributes:
        rank: Global rank (0 writes every file).
        world_size: Number of processes.
        local_rank: Rank on this machine (its GPU index).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether several processes train together."""
        return self.world_size > 1


def distributed_info(env: Mapping[str, str] | None = None) -> DistributedInfo:
    """The ``torchrun`` variables ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` of an environment.

    Args:
        env: The environment (default ``os.environ``).

    Returns:
        The process's place; a single process (``world_size`` 1) when they are not set.

    Raises:
        InvalidInput: For values that are not integers or do not fit together.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return DistributedInfo()
    try:
        world = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise InvalidInput(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({exc})") from exc
    if world < 1 or not 0 <= rank < world or local < 0:
        raise InvalidInput(f"RANK {rank} / WORLD_SIZE {world} / LOCAL_RANK {local} do not fit")
    return DistributedInfo(rank=rank, world_size=world, local_rank=local)
