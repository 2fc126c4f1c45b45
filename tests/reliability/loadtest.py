"""Load run: N concurrent clients for M minutes against the service on loopback.

Starts the real service (uvicorn, `tests.reliability.stub_app`: the product with a stub runner
that takes ``--job-seconds`` per job instead of running the network) in its own process, unless
``--url`` names one already running on this machine, and runs ``--clients`` asyncio clients
(httpx) for the duration. Each client loops: pick an action, send it, think 0 to
2 x ``--think`` seconds. The actions and their weights (what a TPS integration does: submit, then
poll, fetch the results; and the probes and scrapes of the platform):

========== ====== ==================================================================
action     weight request
========== ====== ==================================================================
submit     5      ``POST /v1/recontour?wait=false``, the tiny case (8 + 8 slices,
                  two zips, 60 kB): validated, queued, run by the stub runner
poll       40     ``GET /v1/jobs/{id}`` of a job submitted earlier
artefact   10     ``GET /v1/jobs/{id}/qa`` or ``/rtstruct`` of a succeeded job
live       15     ``GET /health/live``
ready      10     ``GET /health/ready``
metrics    20     ``GET /metrics``
========== ====== ==================================================================

An error is a transport failure, a 5xx other than the back-pressure 503 of a full queue (counted
apart as ``busy``), or a 4xx the action should not get. The server's resident set size (RSS,
``/proc/<pid>/status``) and open file descriptors are sampled every ``--sample`` seconds.
Drift = mean RSS of the last 30 s over the mean RSS of the 30 s after the first 30 s (warm-up).

Example (the figures of docs/reliability.md)::

    python -m tests.reliability.loadtest --clients 50 --minutes 5 --out load-50x5.json

Loopback only: ``--url`` must name 127.0.0.1, ::1 or localhost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from tests.reliability.cases import build_case
from tests.reliability.server import API_KEY, rss_kib, start_server

ACTIONS = {"submit": 5, "poll": 40, "artefact": 10, "live": 15, "ready": 10, "metrics": 20}
#: Statuses each action may get without it being an error.
EXPECTED = {
    "submit": {202, 503},
    "poll": {200},
    "artefact": {200},
    "live": {200},
    "ready": {200},
    "metrics": {200},
}
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@dataclass
class Stats:
    """What the clients saw."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    error_examples: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    succeeded: list[str] = field(default_factory=list)
    busy: int = 0

    def record(self, action: str, status: int, seconds: float) -> None:
        self.latencies[action].append(seconds)
        self.statuses[(action, status)] += 1
        if status == 503 and action == "submit":
            self.busy += 1
        elif status not in EXPECTED[action]:
            self.error(f"{action}: HTTP {status}")

    def error(self, what: str) -> None:
        self.errors[what.split(":")[0] + ": " + what.split(": ", 1)[-1][:60]] += 1
        if len(self.error_examples) < 20:
            self.error_examples.append(what[:300])


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p95, p99 and max of `values` in milliseconds."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {
        "n": len(values),
        "p50_ms": round(at(0.50), 1),
        "p95_ms": round(at(0.95), 1),
        "p99_ms": round(at(0.99), 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


async def client_loop(
    http: httpx.AsyncClient,
    stats: Stats,
    deadline: float,
    think: float,
    files: list[tuple[str, tuple[str, bytes, str]]],
    rng: random.Random,
) -> None:
    """One client: actions until the deadline."""
    names, weights = list(ACTIONS), list(ACTIONS.values())
    while time.monotonic() < deadline:
        action = rng.choices(names, weights)[0]
        if action in ("poll", "artefact") and not stats.jobs:
            action = "live"
        if action == "artefact" and not stats.succeeded:
            action = "poll"
        t0 = time.perf_counter()
        try:
            if action == "submit":
                r = await http.post("/v1/recontour", params={"wait": "false"}, files=files)
                if r.status_code == 202:
                    stats.jobs.append(r.json()["id"])
                    del stats.jobs[:-500]
            elif action == "poll":
                r = await http.get(f"/v1/jobs/{rng.choice(stats.jobs)}")
                if r.status_code == 200 and r.json()["status"] == "succeeded":
                    stats.succeeded.append(r.json()["id"])
                    del stats.succeeded[:-500]
                elif r.status_code == 200 and r.json()["status"] == "failed":
                    stats.error(f"poll: job failed {r.json().get('error')}")
            elif action == "artefact":
                job = rng.choice(stats.succeeded)
                r = await http.get(f"/v1/jobs/{job}/{rng.choice(['qa', 'rtstruct'])}")
            elif action == "live":
                r = await http.get("/health/live")
            elif action == "ready":
                r = await http.get("/health/ready")
            else:
                r = await http.get("/metrics")
            stats.record(action, r.status_code, time.perf_counter() - t0)
        except httpx.HTTPError as exc:
            stats.error(f"{action}: transport {type(exc).__name__}: {exc}")
        await asyncio.sleep(rng.uniform(0, 2 * think))


async def sampler(
    pid: int | None, interval: float, t0: float, out: list[dict[str, float]], stop: asyncio.Event
) -> None:
    """RSS (MiB) and open file descriptors of the server every `interval` seconds."""
    while not stop.is_set():
        if pid is not None:
            try:
                fds = len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                fds = -1
            out.append(
                {
                    "t_s": round(time.monotonic() - t0, 1),
                    "rss_mib": round(rss_kib(pid) / 1024, 1),
                    "fds": fds,
                    "load1": os.getloadavg()[0],
                }
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


def drift(samples: list[dict[str, float]], duration: float) -> dict[str, float]:
    """RSS figures: baseline (30-60 s), final (last 30 s), drift %, min, max."""
    if not samples:
        return {}
    rss = [s["rss_mib"] for s in samples]
    warm = min(30.0, duration / 4)
    base = [s["rss_mib"] for s in samples if warm <= s["t_s"] < 2 * warm] or rss[:1]
    last = [s["rss_mib"] for s in samples if s["t_s"] >= duration - warm] or rss[-1:]
    baseline, final = statistics.fmean(base), statistics.fmean(last)
    return {
        "baseline_mib": round(baseline, 1),
        "final_mib": round(final, 1),
        "drift_pct": round(100 * (final - baseline) / baseline, 2),
        "min_mib": min(rss),
        "max_mib": max(rss),
        "start_mib": rss[0],
    }


async def run_load(
    url: str,
    key: str,
    clients: int,
    seconds: float,
    think: float,
    pid: int | None,
    sample: float,
    seed: int,
) -> dict[str, Any]:
    """Run the clients and return the report."""
    planning, daily = build_case().parts()
    files = [("planning", p) for p in planning] + [("daily", p) for p in daily]
    stats = Stats()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as http:
        r = await http.post("/v1/recontour", params={"timeout": "30"}, files=files)
        if r.status_code != 200 or r.json()["status"] != "succeeded":
            raise RuntimeError(f"the first job did not succeed: {r.status_code} {r.text[:300]}")
        stats.jobs.append(r.json()["id"])
        stats.succeeded.append(r.json()["id"])
        t0 = time.monotonic()
        samples: list[dict[str, float]] = []
        stop = asyncio.Event()
        watcher = asyncio.create_task(sampler(pid, sample, t0, samples, stop))
        deadline = t0 + seconds
        await asyncio.gather(
            *(
                client_loop(http, stats, deadline, think, files, random.Random(seed + k))
                for k in range(clients)
            )
        )
        elapsed = time.monotonic() - t0
        stop.set()
        await watcher
        metrics = (await http.get("/metrics")).text
    jobs = {
        k: float(v)
        for k, v in re.findall(r'^jrs_jobs\{state="(\w+)"\} (\S+)$', metrics, re.MULTILINE)
    }
    server_5xx = sum(
        float(n)
        for n in re.findall(
            r'^jrs_http_requests_total\{.*status="5\d\d".*\} (\S+)$', metrics, re.MULTILINE
        )
    )
    every = [x for values in stats.latencies.values() for x in values]
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "think_s": think,
        "requests": len(every),
        "throughput_rps": round(len(every) / elapsed, 1),
        "errors": sum(stats.errors.values()),
        "error_kinds": dict(stats.errors),
        "error_examples": stats.error_examples,
        "busy_503": stats.busy,
        "server_5xx_from_metrics": server_5xx,
        "latency": {"all": percentiles(every)}
        | {a: percentiles(v) for a, v in sorted(stats.latencies.items())},
        "statuses": {f"{a} {s}": n for (a, s), n in sorted(stats.statuses.items())},
        "jobs": jobs,
        "rss": drift(samples, elapsed),
        "fds": {
            "start": samples[0]["fds"],
            "end": samples[-1]["fds"],
            "max": max(s["fds"] for s in samples),
        }
        if samples
        else {},
        "samples": samples,
    }


def markdown(report: dict[str, Any]) -> str:
    """The report as a short markdown summary."""
    lat = report["latency"]
    lines = [
        f"clients {report['clients']}, {report['seconds']} s, think 0-{2 * report['think_s']:g} s:"
        f" {report['requests']} requests ({report['throughput_rps']} req/s), "
        f"errors {report['errors']}, busy 503 {report['busy_503']}, "
        f"server 5xx {report['server_5xx_from_metrics']:g}",
        "",
        "| action | n | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for action, p in lat.items():
        if p.get("n"):
            lines.append(
                f"| {action} | {p['n']} | {p['p50_ms']} | {p['p95_ms']} | "
                f"{p['p99_ms']} | {p['max_ms']} |"
            )
    rss = report["rss"]
    if rss:
        lines += [
            "",
            f"server RSS: start {rss['start_mib']} MiB, baseline {rss['baseline_mib']} "
            f"MiB, final {rss['final_mib']} MiB, max {rss['max_mib']} MiB, drift "
            f"{rss['drift_pct']} %; open fds {report['fds']}",
        ]
    lines.append(f"jobs in the store: {report['jobs']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.reliability.loadtest", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, help="duration in seconds (overrides --minutes)")
    parser.add_argument("--think", type=float, default=0.5, help="mean think time, s")
    parser.add_argument(
        "--job-seconds",
        type=float,
        default=0.2,
        help="time the stub runner takes per job (own server only)",
    )
    parser.add_argument("--workers", type=int, default=2, help="JRS_MAX_CONCURRENT_JOBS")
    parser.add_argument("--url", help="a service already running on loopback")
    parser.add_argument(
        "--key",
        default=os.environ.get("JRS_LOAD_KEY", ""),
        help="its API key (default $JRS_LOAD_KEY)",
    )
    parser.add_argument("--pid", type=int, help="its process id, for the RSS samples")
    parser.add_argument("--sample", type=float, default=5.0, help="RSS sampling interval, s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 500:
        parser.error("--clients must be 1..500")
    seconds = args.seconds if args.seconds is not None else 60 * args.minutes
    if not 1 <= seconds <= 3600:
        parser.error("the duration must be 1 s to 60 min")
    server = None
    if args.url:
        host = urlsplit(args.url).hostname or ""
        if host not in LOOPBACK:
            parser.error(f"--url must be on loopback ({', '.join(sorted(LOOPBACK))}), got {host!r}")
        url, key, pid = args.url, args.key, args.pid
    else:
        root = Path(tempfile.mkdtemp(prefix="jrs-load-"))
        env = {
            "JRS_STUB_DELAY_S": str(args.job_seconds),
            "JRS_MAX_CONCURRENT_JOBS": str(args.workers),
            "JRS_QUEUE_SIZE": "64",
        }
        server = start_server(root / "data", root / "service.log", env=env)
        url, key, pid = server.url, API_KEY, server.pid
        print(f"service pid {pid} at {url}, log {root / 'service.log'}", file=sys.stderr)  # noqa: T201
    environment = {
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    try:
        report = asyncio.run(
            run_load(url, key, args.clients, seconds, args.think, pid, args.sample, args.seed)
        )
    finally:
        if server is not None:
            server.stop()
    report["environment"] = environment | {"load_after": os.getloadavg()}
    report["stub_job_seconds"] = args.job_seconds if server is not None else None
    print(markdown(report))  # noqa: T201
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1), encoding="utf-8")
    return 0 if report["errors"] == 0 and report["server_5xx_from_metrics"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
