"""The real service with a stub runner, for runs in a separate process (corpus, faults, load).

Everything is the product (`jrs.service.app.create_app`, settings from ``JRS_*``, uploads, job
store, workers, logs) except the runner, which writes small stand-in artefacts instead of running
the network, so that a load or fault run measures the service itself. Knobs (environment):

- ``JRS_STUB_DELAY_S``: seconds each job takes (default 0.05).
- ``JRS_STUB_HOLD_FILE``: while this file exists, a started job waits (it stays ``running``).
- ``JRS_STUB_CRASH``: when ``1``, a job whose planning upload holds an entry named ``CRASH``
  kills the whole process with ``os._exit(137)`` as the kernel's OOM killer would.

Run it as ``python -m tests.reliability.stub_app --port P`` (same uvicorn options as
``jrs serve``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from jrs.core.errors import InvalidInput
from jrs.service.app import create_app as create_service_app
from jrs.service.settings import load_settings

#: A 1x1 grey PNG.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010800000000"
    "3a7e9b550000000a49444154789c63680000008200816f9f3e7d0000000049454e44ae426082"
)


class StubRunner:
    """Writes stand-in artefacts: the planning RTSTRUCT, a zero DVF, a QA JSON and a PNG."""

    device = "cpu"
    execution_provider = "StubExecutionProvider"

    def __init__(
        self, delay_s: float = 0.05, hold_file: Path | None = None, crash: bool = False
    ) -> None:
        self.delay_s = delay_s
        self.hold_file = hold_file
        self.crash = crash

    @classmethod
    def from_env(cls) -> StubRunner:
        """Configured from the ``JRS_STUB_*`` variables."""
        hold = os.environ.get("JRS_STUB_HOLD_FILE")
        return cls(
            delay_s=float(os.environ.get("JRS_STUB_DELAY_S", "0.05")),
            hold_file=Path(hold) if hold else None,
            crash=os.environ.get("JRS_STUB_CRASH", "") == "1",
        )

    def __call__(self, job_dir: Path, planning_dir: Path, daily_dir: Path) -> dict[str, Any]:
        """Re-contour one job (stand-in)."""
        while self.hold_file is not None and self.hold_file.exists():
            time.sleep(0.02)
        if self.crash and any(planning_dir.rglob("CRASH")):
            os._exit(137)  # the process dies mid-job, as under the OOM killer
        if self.delay_s:
            time.sleep(self.delay_s)
        rtstruct = planning_dir / "rtstruct.dcm"
        if not rtstruct.is_file():
            raise InvalidInput("stub runner: the planning RTSTRUCT is missing")
        shutil.copyfile(rtstruct, job_dir / "rtstruct.dcm")
        shutil.copyfile(rtstruct, job_dir / "registration.dcm")
        header = (
            "ObjectType = Image\nNDims = 3\nDimSize = 1 1 1\nElementNumberOfChannels = 3\n"
            "ElementType = MET_FLOAT\nElementDataFile = LOCAL\n"
        )
        (job_dir / "dvf.mha").write_bytes(header.encode() + bytes(12))
        (job_dir / "review.png").write_bytes(PNG)
        qa = {"structures": {"Prostate": {"flag": "ok"}}, "runner": "stub"}
        (job_dir / "qa.json").write_text(json.dumps(qa), encoding="utf-8")
        return qa


def create_app() -> FastAPI:
    """The service app (settings from ``JRS_*``) with the stub runner."""
    return create_service_app(load_settings(), StubRunner.from_env())


def main(argv: list[str] | None = None) -> None:
    """Serve the stub app with uvicorn on 127.0.0.1 (as ``jrs serve`` does)."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(), host=args.host, port=args.port, log_config=None, access_log=False)


if __name__ == "__main__":
    main()
