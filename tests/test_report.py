"""The HTML report on synthetic runs with a known answer (see effopd.analysis.synthetic).

"opd": only q, v, up and down move, along a fixed rank-2 direction, checkpoints at steps 4, 10
and 40 (the first at 10% of training), analysed with an evaluation whose accuracy is
0.2 + 0.6 × (projection of θ − θ_0 onto θ_T − θ_0) — so θ_0 + α(θ_t − θ_0) scores about
0.2 + 0.6·α·t/T and recovery ≈ α·t/T. "rl": every type moves along a rank-8 direction under heavy
noise, analysed without evaluation. "bare": metrics.jsonl only, no analysis.
"""

import argparse
import contextlib
import base64
import json
import math
import re
import statistics
import warnings

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from effopd.analysis import analyze, synthetic
import effopd.report.verdict as V
from effopd.report import SECTION_IDS, ReportError, add_arguments, build_report, run
from effopd.report.load import load_run

STEPS = [4, 10, 40]


def projection_eval(base, final):
    b, f = load_file(base / "model.safetensors"), load_file(final / "model.safetensors")
    D = {k: f[k].double() - b[k].double() for k in b}
    den = sum(float((d * d).sum()) for d in D.values())

    def eval_fn(model_dir):
        m = load_file(model_dir / "model.safetensors")
        proj = sum(float(((m[k].double() - b[k].double()) * D[k]).sum()) for k in D) / den
        return {"accuracy": 0.2 + 0.6 * proj}

    return eval_fn


def write_metrics(run_dir, steps=40, effopd=True, seed=0):
    """A plausible metrics.jsonl: eval every 10 steps, EffOPD searches at powers of two."""
    g = torch.Generator().manual_seed(seed)
    rows = [{"step": 0, "eval/accuracy": 0.2, "eval/mean_length": 30.0}]
    searches = 0
    for s in range(1, steps + 1):
        r = float(torch.rand(1, generator=g))
        row = {"step": s, "train/loss": r, "train/reverse_kl": 1 / math.sqrt(s), "train/reward": 0.2 + s / 60 + 0.1 * r,
               "train/response_length": 40 - s / 4, "train/grad_norm": 1.0, "train/lr": 1e-5, "time/step": 0.5,
               "time/rollout": 0.3, "time/score": 0.1, "time/update": 0.1}
        if effopd and s & (s - 1) == 0:
            searches += 1
            row.update({"extrapolate/s0": 0.3, "extrapolate/best": 0.4, "extrapolate/accepted_c": 3.0,
                        "extrapolate/candidates": [3.0, 5.0], "extrapolate/scores": [0.4, 0.35], "extrapolate/noise": 0.02,
                        "extrapolate/update_norm": 0.1 * s, "extrapolate/seconds": 1.5, "extrapolate/total_seconds": 1.5 * searches})
        if s % 10 == 0:
            row.update({"eval/accuracy": 0.2 + s / 80, "eval/mean_length": 30 - s / 10, "eval/avg@1": 0.2 + s / 80})
        rows.append(row)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_run(tmp_path_factory, name):
    """Build one of the run directories "opd", "rl", "bare" (and the shared base) once per
    session, under the session's base temp dir, so that both report test modules reuse them."""
    root = tmp_path_factory.getbasetemp() / "report-runs"
    d = root / name
    if (root / f"{name}.done").exists():
        return d
    torch.set_num_threads(1)
    base = root / "base"
    if not (root / "base.done").exists():
        cfg = tf.Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)
        synthetic.write_base(cfg, base)
        (root / "base.done").write_text("")
    if name == "opd":
        ck = synthetic.write_run(base, d / "checkpoints", STEPS, rank=2, noise=0.02, types=("q", "v", "up", "down"))
        analyze(base, ck, d / "analysis", rank=2, eval_fn=projection_eval(base, ck[-1][1]), alphas=(0, 1, 3, 8),
                fracs=(0.1,), window=1, progress=False)
        (d / "config.yaml").write_text("loss:\n  method: opd\nextrapolate:\n  enabled: true\n")
    elif name == "rl":
        ck = synthetic.write_run(base, d / "checkpoints", STEPS, rank=8, noise=0.5, seed=1)
        analyze(base, ck, d / "analysis", rank=2, progress=False)
        (d / "config.yaml").write_text("loss:\n  method: grpo\nextrapolate:\n  enabled: false\n")
    d.mkdir(parents=True, exist_ok=True)
    write_metrics(d, effopd=name == "opd", seed=len(name))
    (root / f"{name}.done").write_text("")
    return d


def make_runs(tmp_path_factory, names=("opd", "rl", "bare")):
    return [make_run(tmp_path_factory, n) for n in names][0].parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def reports(runs, tmp_path_factory):
    """The HTML of: the analysed run alone, the bare run alone, and "opd" + "rl" side by side."""
    out = tmp_path_factory.mktemp("reports")
    with _no_warnings():
        one = build_report([runs / "opd"], out / "one.html").read_text()
        bare = build_report([runs / "bare"], out / "bare.html").read_text()
        two = build_report([runs / "opd", runs / "rl"], out / "two.html", labels=["OPD", "<b>x</b>"]).read_text()
    return {"one": one, "bare": bare, "two": two}


@contextlib.contextmanager
def _no_warnings():
    """Fail on any RuntimeWarning: a section that fails to render warns (and shows a note)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield


def section_ids(html):
    return re.findall(r'<section id="([^"]+)"', html)


def check_self_contained(html):
    srcs = re.findall(r'\b(?:src|href)="([^"]*)"', html)
    assert srcs and all(s.startswith(("data:image/png;base64,", "#")) for s in srcs), [s[:40] for s in srcs if not s.startswith(("data:", "#"))]
    assert not re.search(r"https?://", html) and "<script" not in html and "<link" not in html
    for uri in re.findall(r'src="data:image/png;base64,([^"]+)"', html):
        assert base64.b64decode(uri)[:8] == b"\x89PNG\r\n\x1a\n"


def check_figures(html):
    figures = re.findall(r"<figure>(.*?)</figure>", html, re.S)
    assert figures
    for f in figures:
        assert f.count("<figcaption>") == 1 and "<img " in f
        caption = re.search(r"<figcaption>(.*?)</figcaption>", f, re.S).group(1)
        assert caption.endswith(".") and len(caption) > 40


def test_single_run_has_every_section(reports):
    html = reports["one"]
    assert section_ids(html) == list(SECTION_IDS) and SECTION_IDS[0] == "verdict"
    assert "could not be rendered" not in html and "Analysis not run" not in html
    check_self_contained(html)
    check_figures(html)
    # one plot each at least in these sections (the run has analysis, evaluation and EffOPD searches)
    for sid in ("training", "search", "magnitude", "spectrum", "alignment", "scaling", "trajectory", "contribution",
                "embedding", "efficiency"):
        body = html.split(f'<section id="{sid}">')[1].split("</section>")[0]
        assert "<img " in body, sid
    assert "7 searches" not in html and "6 searches took 9 s" in html  # steps 1, 2, 4, 8, 16, 32; 1.5 s each
    assert "eff. rank / min(m, n)" in html and "effective rank" in html


def hand_verdict(a):
    """The three verdict numbers, recomputed from analysis.json by the rules in the docs."""
    types = a["settings"]["types"]
    params = {}
    for m in a["modules"].values():
        if m["type"] in types:
            params[m["type"]] = params.get(m["type"], 0) + math.prod(m["shape"])
    per_param = {t: a["magnitude"]["by_type"][t]["share"][-1] / n for t, n in params.items()}
    adjusted = sorted((v / sum(per_param.values()) for v in per_param.values()), reverse=True)
    lift = sum(adjusted[:2]) / (2 / len(adjusted))
    fracs = [m["effective_rank_frac"][-1] for m in a["spectrum"]["per_module"].values() if m["effective_rank_frac"][-1] is not None]
    locks = [m["lock_in_step"] for m in a["alignment"]["per_module"].values() if m["lock_in_step"] is not None]
    rec = [r["recovery"] for r in a["eval"]["scaling"] if r["step"] == a["steps"][0] and r["alpha"] > 1] if a["eval"]["ran"] else []
    return {"lift": lift, "top_share": sum(adjusted[:2]), "rank_frac": statistics.median(fracs),
            "lock_frac": statistics.median(locks) / a["steps"][-1], "best_recovery": max(rec) if rec else None}


def test_verdict_numbers_match_the_json_by_hand(runs, reports):
    opd = load_run(runs / "opd")
    a, answers = opd.analysis, {x.key: x for x in V.verdict(opd)}
    h = hand_verdict(a)
    # 4 of 7 types move alike per parameter: top-2 hold 2/4, uniform 2/7, lift 7/4
    assert h["lift"] == pytest.approx(7 / 4, rel=0.15)  # up to the spread of random W_0 norms
    assert answers["concentration"].numbers["lift"] == pytest.approx(h["lift"])
    assert answers["concentration"].answer == "yes"
    # rank-2 update in 16- and 32-wide matrices; every moving module locks in at step 4 = 10% of T
    assert answers["lock_in"].numbers["rank_frac"] == pytest.approx(h["rank_frac"]) and h["rank_frac"] < V.RANK_FRAC_MAX
    assert answers["lock_in"].numbers["lock_frac"] == pytest.approx(h["lock_frac"]) == 0.1
    assert answers["lock_in"].answer == "yes"
    # recovery of step 4 (t/T = 0.1) scaled by α = 8 is about 0.8
    assert answers["extrapolation"].numbers["best_recovery"] == pytest.approx(h["best_recovery"])
    assert h["best_recovery"] == pytest.approx(0.8, abs=0.05) and answers["extrapolation"].numbers["best_alpha"] == 8
    assert answers["extrapolation"].answer == "yes"
    # the page states the numbers and the thresholds
    verdict_html = reports["one"].split('<section id="verdict">')[1].split("</section>")[0]
    for text in (f"{100 * h['top_share']:.0f}% of the update per parameter", f"{h['lift']:.2f}×",
                 f"threshold: ≥ {V.CONCENTRATION_MIN_LIFT:g}×", f"= {100 * h['rank_frac']:.0f}% of min(m, n)",
                 f"threshold: &lt; {100 * V.RANK_FRAC_MAX:.0f}%", "= 10% of the 40 steps",
                 f"recovers {100 * h['best_recovery']:.0f}% of the final gain", f"threshold: ≥ {100 * V.RECOVERY_MIN:.0f}%"):
        assert text in verdict_html, text
    assert verdict_html.count('class="badge yes"') == 3


def test_high_rank_unevaluated_run(runs):
    rl = load_run(runs / "rl")
    answers = {x.key: x for x in V.verdict(rl)}
    h = hand_verdict(rl.analysis)
    assert answers["concentration"].answer == "no" and answers["concentration"].numbers["lift"] == pytest.approx(h["lift"])
    assert answers["lock_in"].answer == "no" and h["rank_frac"] > V.RANK_FRAC_MAX
    assert answers["extrapolation"].answer == "unknown" and "did not run" in answers["extrapolation"].text


def test_run_without_analysis(reports):
    html = reports["bare"]
    assert section_ids(html) == list(SECTION_IDS)
    assert "could not be rendered" not in html
    assert html.count('class="badge unknown"') == 3
    assert "Analysis not run" in html and "effopd analyze --base" in html
    assert "EffOPD not enabled" in html
    training = html.split('<section id="training">')[1].split("</section>")[0]
    assert "<img " in training
    check_self_contained(html)
    check_figures(html)


def test_two_runs_side_by_side_and_escaped(reports):
    html = reports["two"]
    assert section_ids(html) == list(SECTION_IDS)
    assert "could not be rendered" not in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "<b>x</b>" not in html
    assert html.count("--cols: 2") >= 8  # per-run plots and tables in two columns
    verdict_html = html.split('<section id="verdict">')[1].split("</section>")[0]
    assert verdict_html.count('class="badge ') == 6
    assert "EffOPD not enabled" in html  # rl logged no search
    assert "Evaluation did not run" in html  # rl was analysed without evaluation
    check_self_contained(html)
    check_figures(html)


def test_damaged_and_partial_inputs(runs, tmp_path):
    """A truncated metrics line, NaN metrics, no tensors file, an analysis with almost nothing in it."""
    d = tmp_path / "damaged"
    (d / "analysis").mkdir(parents=True)
    write_metrics(d)
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 41, "train/reward": NaN}\n{"step": 42, "train/rew')
    a = json.loads((runs / "opd" / "analysis" / "analysis.json").read_text())
    (d / "analysis" / "analysis.json").write_text(json.dumps({**a, "eval": {"ran": False, "reason": "asked"}}))
    e = tmp_path / "empty"
    (e / "analysis").mkdir(parents=True)
    (e / "analysis" / "analysis.json").write_text(json.dumps({"schema": "effopd.analysis/1", "steps": []}))
    with _no_warnings():
        html = build_report([d, e], tmp_path / "r.html").read_text()
    assert section_ids(html) == list(SECTION_IDS) and "could not be rendered" not in html
    assert "skipped 1 unreadable line" in html and "tensors.safetensors" in html and "Evaluation did not run (asked)" in html


def test_errors_and_cli_pair(runs, tmp_path, capsys):
    with pytest.raises(ReportError, match="label"):
        build_report([runs / "opd"], tmp_path / "x.html", labels=["a", "b"])
    with pytest.raises(ReportError, match="does not exist"):
        build_report([tmp_path / "nope"], tmp_path / "x.html")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(runs / "bare"), "--out", str(tmp_path / "cli.html"), "--label", "mine"])
    assert run(args) == 0 and "cli.html" in capsys.readouterr().out
    assert "effopd report: mine" in (tmp_path / "cli.html").read_text()


def scaling_analysis(recoveries, own=None, ran=True):
    rows = [{"step": 5, "alpha": al, "recovery": r} for al, r in recoveries.items()]
    if own is not None:
        rows.append({"step": 5, "alpha": 1, "recovery": own})
    rows.append({"step": 9, "alpha": 10, "recovery": 1.0})  # a later checkpoint does not count
    return {"steps": [5, 9, 50], "eval": {"ran": ran, "scaling": rows, "reason": "off"}}


def test_extrapolation_rule_edges():
    assert V.extrapolation(scaling_analysis({2: 0.6}, own=0.1)).answer == "yes"
    assert V.extrapolation(scaling_analysis({2: 0.4}, own=0.1)).answer == "no"  # below RECOVERY_MIN
    assert V.extrapolation(scaling_analysis({2: 0.6}, own=0.7)).answer == "no"  # no better than the checkpoint
    assert V.extrapolation(scaling_analysis({2: None})).answer == "unknown"  # final model gained nothing
    assert V.extrapolation(scaling_analysis({2: 0.9}, ran=False)).answer == "unknown"
    assert V.extrapolation({"steps": [1], "eval": {"ran": True, "scaling": []}}).answer == "unknown"


def test_concentration_and_lock_in_edges():
    def mag(shares, shapes):
        return {"settings": {"types": list(shares)},
                "modules": {t: {"type": t, "shape": s} for t, s in shapes.items()},
                "magnitude": {"by_type": {t: {"share": [v]} for t, v in shares.items()}}}

    # equal per-parameter energy in 3 types: lift 1 -> no; all of it in one of 3 types: top-2 hold 1, lift 1.5 -> yes
    assert V.concentration(mag({"q": 0.2, "k": 0.2, "up": 0.6}, {"q": (4, 4), "k": (4, 4), "up": (4, 12)})).answer == "no"
    assert V.concentration(mag({"q": 1.0, "k": 0.0, "up": 0.0}, {"q": (4, 4), "k": (4, 4), "up": (4, 12)})).answer == "yes"
    assert V.concentration(mag({"q": 1.0}, {"q": (4, 4)})).answer == "unknown"
    # truncated spectrum holding little energy: a low effective rank is not trusted
    a = {"steps": [1, 10], "modules": {"m": {"shape": [1000, 1000], "svd_q": 100}},
         "spectrum": {"per_module": {"m": {"effective_rank_frac": [0.05], "effective_rank": [50.0], "captured_energy": [0.5]}}},
         "alignment": {"per_module": {"m": {"lock_in_step": 1}}}}
    assert V.lock_in(a).answer == "unknown"
    a["spectrum"]["per_module"]["m"]["captured_energy"] = [0.95]
    assert V.lock_in(a).answer == "yes"
    a["alignment"]["per_module"]["m"]["lock_in_step"] = 10
    assert V.lock_in(a).answer == "no"
