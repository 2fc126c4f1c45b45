"""Which flags an organ's contours share, chosen by leave-one-case-out (docs/qa.md, version 3).

usage: python -m research.qa_spread_choice REPORT_DIR

For each rule of `jrs.qa.family` (which flags of one contour reach the organ's other contours),
the thresholds are chosen on every case of REPORT_DIR (`research.qa_choice.choose_thresholds`)
and estimated leaving one case out (`cross_validate`), each search starting from the thresholds
before this calibration (`PRE_CALIBRATION`: session 17's defaults, with the second opinion's
priors and its bladder limit, which the 22-case calibration turned off), not from the ones it
chose. The rule kept is the one with the highest recall left
out while both false-flag rates (good contours; and strict, good contours in a wrong DVF counted
as good) stay <= 0.1; then the lower strict rate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import research.qa_choice as q
from jrs.qa.figures import QaThresholds
from research.qa_report import _flag_rates, cross_validate, wrong_dvf_rates
from research.qa_runs import load_records

#: The thresholds this calibration started from (those it moved, at their values before).
PRE_CALIBRATION: dict[str, float] = {
    "volume_change_range.prostate.high": 0.1,
    "max_jacobian_outlier_fraction": 0.076,
    "min_image_ncc.rectum": 0.7,
    "max_image_fit_gain.*": 0.4908,
    "max_image_fit_gain.prostate": 0.523,
}
#: The rules compared: the flags shared.
RULES: dict[str, tuple[str, ...]] = {
    "misregistration, image_disagreement, jacobian_outliers, method_disagreement": (
        "misregistration",
        "image_disagreement",
        "jacobian_outliers",
        "method_disagreement",
    ),
    "misregistration, jacobian_outliers, method_disagreement": (
        "misregistration",
        "jacobian_outliers",
        "method_disagreement",
    ),
    "none": (),
}


def main() -> None:
    """Print, per rule, the rates in sample and left out, and the thresholds moved."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report_dir", type=Path)
    args = ap.parse_args()
    samples = q.samples_from_records(load_records(args.report_dir))
    prior = q.thresholds_with(QaThresholds(), PRE_CALIBRATION)
    good, bad = int(samples.good.sum()), int(samples.bad.sum())
    sys.stdout.write(f"{len(samples)} structures: {good} good, {bad} bad\n")
    for name, shared in RULES.items():
        q.SPREAD_FLAGS = shared  # the rule `fired_matrix` and the search apply
        choice = q.choose_thresholds(samples, prior)
        fired = _flag_rates(samples, choice.thresholds)["fired"]
        strict = wrong_dvf_rates(fired, samples)["strict"]["false_flag_rate"]
        cv = cross_validate(samples, prior)
        assert cv is not None
        left_strict = cv["wrong_dvf"]["strict"]["false_flag_rate"]
        sys.stdout.write(
            f"shared: {name}\n"
            f"  in sample: recall {choice.recall}, false flags {choice.false_flag_rate}, "
            f"strict {strict}\n"
            f"  left out:  recall {cv['any']['recall']}, false flags "
            f"{cv['any']['false_flag_rate']}, strict {left_strict}\n"
        )
        for key, value in choice.values.items():
            before = q._get(prior, key)
            if value != before:
                sys.stdout.write(f"    {key}: {before:g} -> {value:g}\n")


if __name__ == "__main__":
    main()
