"""Time of the QA stage and end to end, two versions of the code, alternating, one phantom pair.

usage: python research/qa_stage_cost.py OLD_TREE NEW_TREE [--reps 3] [--work /tmp/qa_time]

OLD_TREE / NEW_TREE are checkouts (e.g. ``git worktree add /tmp/old 4642bb4``). Each run is its
own process with ``PYTHONPATH`` set to its tree, the versions alternate (a shared machine's load
hits both alike), and the medians are printed (docs/benchmarks.md, "The cost of the QA
figures"). The pair is a held-out 512 x 512 phantom (seed 3100, fraction 1), written once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

_RUN = """
import json, shutil, sys
from pathlib import Path
from jrs.pipeline.run import recontour
out = Path(sys.argv[1])
shutil.rmtree(out, ignore_errors=True)
result = recontour(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), out)
print(json.dumps(json.loads(result.qa.read_text())["timings_s"]))
"""


def main() -> None:
    """Run both versions REPS times, alternating, and print the medians."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qa_time"))
    args = ap.parse_args()
    case = args.work / "case"
    if not (case / "fraction_1" / "ct").exists():
        from jrs.synth import generate_fraction, generate_patient, write_fraction, write_patient

        patient = generate_patient(3100, matrix=512)
        write_patient(patient, case)
        write_fraction(generate_fraction(patient, 1), case / "fraction_1")
    inputs = [
        str(case / "planning" / "ct"),
        str(case / "planning" / "rtstruct.dcm"),
        str(case / "fraction_1" / "ct"),
    ]
    times: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    for rep in range(args.reps):
        for name, tree in (("old", args.old), ("new", args.new)):
            env = dict(os.environ, PYTHONPATH=str(tree.resolve()))
            out = subprocess.run(
                [sys.executable, "-c", _RUN, str(args.work / f"out_{name}"), *inputs],
                env=env,
                capture_output=True,
                text=True,
                cwd=tree,
                check=True,
            )
            t = json.loads(out.stdout.strip().splitlines()[-1])
            times[name].append(t)
            sys.stdout.write(f"{name} {rep}: qa {t['qa']} s, total {t['total']} s\n")
    for name, ts in times.items():
        qa = statistics.median(t["qa"] for t in ts)
        total = statistics.median(t["total"] for t in ts)
        sys.stdout.write(f"{name}: median qa {qa} s, median total {total} s\n")


if __name__ == "__main__":
    main()
