"""Start the service (stub runner) as a separate uvicorn process on 127.0.0.1 and stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The key the test servers accept.
API_KEY = "reliability-key-5f0c2a9e"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """A running service process.

    Attributes:
        url: base URL (``http://127.0.0.1:<port>``).
        proc: the process.
        log_path: its stderr and stdout (the JSON log lines).
        data_dir: its ``JRS_DATA_DIR``.
    """

    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    data_dir: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        """The process id."""
        return int(self.proc.pid)

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.poll() is None

    def log_text(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig` (SIGTERM: graceful, SIGKILL: crash) and wait; returns the exit code."""
        if self.alive():
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return int(code)

    def kill(self) -> int:
        """SIGKILL: the process dies at once (no shutdown, no cleanup)."""
        return self.stop(signal.SIGKILL)


def start_server(
    data_dir: Path,
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    port: int | None = None,
    timeout: float = 60.0,
    wait: bool = True,
) -> ServerProcess:
    """Start ``python -m tests.reliability.stub_app`` and wait until ``/health/live`` answers.

    Args:
        data_dir: ``JRS_DATA_DIR`` (reuse one to simulate a restart).
        log_path: file receiving the process output (appended to).
        env: more ``JRS_*`` variables (they override the defaults here).
        port: TCP port (a free one when None).
        timeout: seconds to wait for the start.
        wait: wait for ``/health/live`` (False: return at once, e.g. for a process expected to
            die during its start).

    Returns:
        The running server.

    Raises:
        RuntimeError: the process exited or did not answer in time (with its output).
    """
    port = port or free_port()
    values = {
        "JRS_API_KEYS": API_KEY,
        "JRS_DATA_DIR": str(data_dir),
        "JRS_LOG_LEVEL": "INFO",
        "JRS_SHUTDOWN_GRACE_S": "5",
    }
    values.update(env or {})
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("JRS_")}
    full_env.update(values)
    full_env["PYTHONPATH"] = str(REPO_ROOT)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.stub_app", "--port", str(port)],
        cwd=data_dir.parent if data_dir.parent.is_dir() else REPO_ROOT,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log_path, data_dir, log)
    if not wait:
        return server
    deadline = time.monotonic() + timeout
    while True:
        if not server.alive():
            server.stop()
            raise RuntimeError(f"the service exited at start:\n{server.log_text()[-4000:]}")
        try:
            if httpx.get(f"{server.url}/health/live", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"the service did not start:\n{server.log_text()[-4000:]}")
        time.sleep(0.05)


def rss_kib(pid: int) -> int:
    """Resident set size of a process (KiB), from ``/proc/<pid>/status``; 0 when unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


def wait_for_ready(url: str, timeout: float = 30.0) -> None:
    """Wait until ``/health/ready`` answers 200 (RuntimeError after `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} never became ready")


__all__ = [
    "API_KEY",
    "AUTH",
    "ServerProcess",
    "free_port",
    "rss_kib",
    "signal",
    "start_server",
    "wait_for_ready",
]
