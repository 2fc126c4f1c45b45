"""Networks scored in separate `jrs evaluate` runs, compared paired (`--with-metrics`)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from jrs.core.errors import InvalidInput
from jrs.training.earlier_metrics import read_evaluation
from jrs.training.evaluate import evaluate
from jrs.training.networks import build
from jrs.training.synthetic import synthetic_pair


def _pairs(seed: int = 30) -> list:
    return [synthetic_pair(seed + i, 40) for i in range(2)]


def _flat(text: str) -> str:
    """CLI output without whitespace and the error box's frame (it wraps long paths)."""
    return re.sub(r"[\s│╭╮╰╯─]+", "", text)


def _net(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build(name, channels=(4, 8, 8))


def test_earlier_rows_join_the_report_unchanged(tmp_path: Path) -> None:
    pairs = _pairs()
    first = evaluate({"seg@1": _net("seg", 0)}, pairs, tmp_path / "a", window=96, fusion=None)
    old = read_evaluation(tmp_path / "a" / "metrics.csv")
    assert old.models == {"seg@1"} and old.pairs == {p.key for p in pairs}
    assert len(old.rows) == len(first.rows) == 2 * 4
    for got, want in zip(old.rows, first.rows, strict=True):  # the CSV round trip keeps them
        assert got["organ"] == int(want["organ"]) and got["pair"] == want["pair"]
        for k in ("dsc", "msd", "hd95"):
            a, b = float(got[k]), float(want[k])
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12)
    both = evaluate(
        {"reg@1": _net("reg", 1)},
        pairs,
        tmp_path / "b",
        window=96,
        fusion=None,
        earlier=[read_evaluation(tmp_path / "a")],  # the folder works too
    )
    assert {r["model"] for r in both.rows} == {"seg@1", "reg@1"}
    assert len(both.rows) == 2 * 2 * 4
    # the report compares them pair by pair, as if both had been scored in one run
    assert "| seg@1 | seg |" in both.markdown and "| reg@1 | reg |" in both.markdown
    assert "Wilcoxon" in both.markdown
    merged = read_evaluation(tmp_path / "b")
    assert merged.models == {"seg@1", "reg@1"}
    assert {r["model"] for r in merged.jacobian} == {"reg@1"}  # only networks with a field
    assert not (tmp_path / "b" / "export_metrics.json").exists()  # not one model's figures


def test_other_pairs_are_refused_with_the_file_named(tmp_path: Path) -> None:
    evaluate({"seg@1": _net("seg", 0)}, _pairs(30), tmp_path / "a", window=96, fusion=None)
    old = read_evaluation(tmp_path / "a")
    with pytest.raises(InvalidInput, match=r"a/metrics.csv: scores other pairs.*same held-out"):
        evaluate({"reg@1": _net("reg", 1)}, _pairs(40), window=96, fusion=None, earlier=[old])


def test_a_repeated_model_name_is_refused(tmp_path: Path) -> None:
    pairs = _pairs()
    evaluate({"seg@1": _net("seg", 0)}, pairs, tmp_path / "a", window=96, fusion=None)
    old = read_evaluation(tmp_path / "a")
    with pytest.raises(InvalidInput, match=r"model names \['seg@1'\] are already"):
        evaluate({"seg@1": _net("seg", 2)}, pairs, window=96, fusion=None, earlier=[old])


def test_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no such metrics.csv"):
        read_evaluation(tmp_path / "absent.csv")
    bad = tmp_path / "metrics.csv"
    bad.write_text("model,pair,dsc\nx,p,0.5\n")
    with pytest.raises(InvalidInput, match=r"metrics.csv: not a jrs evaluate table.*'organ'"):
        read_evaluation(bad)
    bad.write_text("model,path,pair,organ,dsc,msd,hd95\nx,seg,p,prostate,0.5,1,2\n")
    with pytest.raises(InvalidInput, match="line 2: not a number"):
        read_evaluation(bad)
    bad.write_text("model,path,pair,organ,dsc,msd,hd95\n")
    with pytest.raises(InvalidInput, match="no rows"):
        read_evaluation(bad)


def test_cli_merges_without_a_new_network(tmp_path: Path) -> None:
    """`jrs evaluate --with-metrics A --with-metrics B`: a report of runs made apart."""
    from typer.testing import CliRunner

    from jrs.cli import app
    from jrs.training.config import SyntheticSource
    from jrs.training.sources import source_pairs

    pairs = source_pairs(None, SyntheticSource(count=2, seed=30, size=64))  # as the CLI makes them
    for name, net, folder in (("seg@1", "seg", "a"), ("reg@1", "reg", "b")):
        evaluate({name: _net(net, 0)}, pairs, tmp_path / folder, window=96, fusion=None)
    args = ["evaluate", "--synthetic", "2", "--seed", "30", "--fusion", "none"]
    args += ["--with-metrics", str(tmp_path / "a" / "metrics.csv")]
    args += ["--with-metrics", str(tmp_path / "b" / "metrics.csv"), "--out", str(tmp_path / "c")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert read_evaluation(tmp_path / "c").models == {"seg@1", "reg@1"}
    other = [*args[:4], "31", *args[5:]]  # other pairs: refused, the file named
    res = CliRunner().invoke(app, other)
    assert res.exit_code == 2 and "a/metrics.csv:scoresotherpairs" in _flat(res.output)
    absent = [*args[:7], "--with-metrics", str(tmp_path / "x.csv"), "--out", str(tmp_path / "d")]
    res = CliRunner().invoke(app, absent)
    assert res.exit_code == 2 and "x.csv:nosuchmetrics.csv" in _flat(res.output)
