"""`effopd demo --quick` end to end on the shipped models (about 2.5 minutes on 2 cores)."""

from __future__ import annotations

import json

import pytest

from effopd import cli
from effopd.demo import DEMO_RUNS, QUICK


@pytest.mark.slow
def test_quick_demo_writes_every_run_and_one_report(tmp_path, capsys):
    run_dir = tmp_path / "d"
    assert cli.main(["demo", "--quick", "--no-progress", "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "[1/7] models" in out and "[7/7] writing the report" in out  # every stage announced, in order
    assert f"report: {run_dir / 'report.html'}" in out
    record = json.loads((run_dir / "demo.json").read_text())
    assert record["budget"]["steps"] == QUICK.steps
    assert record["accuracy"]["teacher"] > 0.9 and record["accuracy"]["student"] < 0.6  # the shipped pair
    for name, label in DEMO_RUNS:
        run = run_dir / name
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(QUICK.steps + 1))
        evals = [r["step"] for r in rows if "eval/accuracy" in r]
        assert evals == list(range(0, QUICK.steps + 1, QUICK.eval_every))
        assert (run / "checkpoints" / f"step-{QUICK.steps}" / "COMPLETE").exists()
        analysis = json.loads((run / "analysis" / "analysis.json").read_text())
        assert analysis["steps"] == list(range(QUICK.eval_every, QUICK.steps + 1, QUICK.eval_every))
        assert analysis["eval"]["ran"] and analysis["eval"]["scaling"]
        assert record["runs"][name]["final"] == rows[-1]["eval/accuracy"]
    # the same budget for all three: steps, sequences per step, learning rate
    from effopd.config import load_config

    cfgs = [load_config([run_dir / name / "config.yaml"]) for name, _ in DEMO_RUNS]
    assert len({(c.train.steps, c.rollout.batch_size * c.rollout.n, c.optim.lr) for c in cfgs}) == 1
    assert [c.loss.method for c in cfgs] == ["opd", "opd", "grpo"] and cfgs[1].extrapolate.enabled
    effopd_rows = [json.loads(x) for x in (run_dir / "opd-effopd" / "metrics.jsonl").read_text().splitlines()]
    assert any("extrapolate/s0" in r for r in effopd_rows)
    html = (run_dir / "report.html").read_text()
    for _, label in DEMO_RUNS:
        assert label in html
    assert "<img" in html or "<svg" in html

    # a second demo into the same directory is refused, and nothing there changes
    before = sorted((p, p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    assert cli.main(["demo", "--quick", "--no-progress", "--run-dir", str(run_dir)]) == 2
    assert "already holds a demo" in capsys.readouterr().err
    assert sorted((p, p.stat().st_mtime_ns) for p in run_dir.rglob("*")) == before
