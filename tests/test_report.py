"""The HTML report on synthetic runs with a known answer (see effopd.analysis.synthetic; built
once per session by conftest.make_report_run).

"opd": only q, v, up and down move, along a fixed rank-2 direction, checkpoints at steps 4, 10
and 40 (the first at 10% of training), analysed with an evaluation whose accuracy is
0.2 + 0.6 × (projection of θ − θ_0 onto θ_T − θ_0) — so θ_0 + α(θ_t − θ_0) scores about
0.2 + 0.6·α·t/T and recovery ≈ α·t/T. "rl": every type moves along a rank-8 direction under heavy
noise, analysed without evaluation. "bare": metrics.jsonl only, no analysis.
"""

import argparse
import base64
import contextlib
import json
import re
import warnings

import pytest

import effopd.report.verdict as V
from conftest import REPORT_STEPS, make_report_runs, write_metrics
from effopd.report import SECTION_IDS, ReportError, add_arguments, build_report, run
from effopd.report.load import load_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_report_runs(tmp_path_factory)


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


def test_thresholds_are_the_ones_the_hand_computations_below_assume():
    assert (V.CONCENTRATION_TOP_K, V.CONCENTRATION_MIN_LIFT) == (2, 1.5)
    assert (V.RANK_FRAC_MAX, V.LOCK_IN_MAX_FRAC, V.MIN_CAPTURED_ENERGY, V.RECOVERY_MIN) == (0.25, 0.25, 0.9, 0.5)


def test_verdict_on_a_run_built_to_say_yes(runs, reports):
    """The "opd" run is built so that all three answers are "yes" (numbers worked out by hand).

    Concentration: D has ‖D‖_F = 0.05‖W_0‖_F and every W_0 entry is drawn with the same std, so
    the update energy per parameter is the same in the 4 moving types (q, v, up, down) and zero in
    the 3 others (k, o, gate): each moving type holds 1/4 of the per-parameter energy, the top 2
    hold C = 1/2, the uniform share of 2 of 7 types is 2/7, lift = (1/2)/(2/7) = 7/4 = 1.75 ≥ 1.5.
    Lock-in: D has two singular values in the ratio 1 : 1/2, effective rank
    exp(H(2/3, 1/3)) = exp(0.6365) = 1.89; the 2% noise only spreads the spectrum, so the
    median over the moving modules (6 of the 8 are 16 wide, 2 are 8 wide) is at least
    1.89/16 = 0.118 and well below 0.25. The direction is fixed from the first checkpoint, so
    every moving module locks in at step 4 = 4/40 = 10% of training ≤ 25%.
    Extrapolation: accuracy 0.2 + 0.6·α·t/T, so scaling step 4 (t/T = 0.1) by α recovers
    α·0.1 of the gain: 0.8 at α = 8 (≥ 0.5), the checkpoint itself (α = 1) 0.1."""
    opd = load_run(runs / "opd")
    answers = {x.key: x for x in V.verdict(opd)}
    conc, lock, ext = answers["concentration"], answers["lock_in"], answers["extrapolation"]

    assert conc.answer == "yes"
    assert conc.numbers["uniform"] == pytest.approx(2 / 7)
    assert conc.numbers["top_share"] == pytest.approx(1 / 2, rel=0.15)  # up to the spread of random W_0 norms
    assert conc.numbers["lift"] == pytest.approx(7 / 4, rel=0.15)
    assert set(conc.numbers["top_types"]) <= {"q", "v", "up", "down"}
    assert all(conc.numbers["adjusted_shares"][t] < 0.01 for t in ("k", "o", "gate"))

    assert lock.answer == "yes"
    assert 1.89 / 16 <= lock.numbers["rank_frac"] < 0.25
    assert lock.numbers["lock_in_step"] == REPORT_STEPS[0] == 4 and lock.numbers["lock_frac"] == 0.1
    moving = {n: m for n, m in opd.analysis["alignment"]["per_module"].items()
              if opd.analysis["modules"][n]["type"] in ("q", "v", "up", "down")}
    assert len(moving) == 8 and all(m["lock_in_step"] == 4 for m in moving.values())

    assert ext.answer == "yes"
    assert ext.numbers["step"] == 4 and ext.numbers["best_alpha"] == 8
    assert ext.numbers["best_recovery"] == pytest.approx(0.8, abs=0.05)
    assert ext.numbers["own_recovery"] == pytest.approx(0.1, abs=0.05)

    # the page states the rules' numbers and the thresholds
    verdict_html = reports["one"].split('<section id="verdict">')[1].split("</section>")[0]
    for text in (f"{100 * conc.numbers['top_share']:.0f}% of the update per parameter", f"{conc.numbers['lift']:.2f}×",
                 "threshold: ≥ 1.5×", f"= {100 * lock.numbers['rank_frac']:.0f}% of min(m, n)", "threshold: &lt; 25%",
                 "median lock-in at step 4 = 10% of the 40 steps", "by α = 8",
                 f"recovers {100 * ext.numbers['best_recovery']:.0f}% of the final gain", "threshold: ≥ 50%"):
        assert text in verdict_html, text
    assert verdict_html.count('class="badge yes"') == 3


def test_verdict_on_a_run_built_to_say_no(runs):
    """The "rl" run: every one of the 7 types moves alike per parameter, so each holds 1/7 of the
    per-parameter energy, the top 2 hold 2/7 = their uniform share: lift 1 < 1.5. Its rank-8
    direction has singular values ∝ 1, 1/2, ..., 1/8: p_i = (1/i)/H_8 with H_8 = 2.718, entropy
    ln H_8 + Σ (ln i / i)/H_8 = 1.000 + 2.218/2.718 = 1.816, effective rank e^1.816 = 6.15 before
    the (heavy) noise spreads it further: at least 6.15/16 = 0.38 of min(m, n) > 0.25. It was
    analysed without evaluation."""
    rl = load_run(runs / "rl")
    answers = {x.key: x for x in V.verdict(rl)}
    assert answers["concentration"].answer == "no"
    assert answers["concentration"].numbers["lift"] == pytest.approx(1.0, rel=0.15)
    assert answers["concentration"].numbers["uniform"] == pytest.approx(2 / 7)
    assert answers["lock_in"].answer == "no" and answers["lock_in"].numbers["rank_frac"] >= 6.15 / 16
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


def scaling_analysis(recoveries, own=None, ran=True, efficiency=None):
    rows = [{"step": 5, "alpha": al, "recovery": r} for al, r in recoveries.items()]
    if own is not None:
        rows.append({"step": 5, "alpha": 1, "recovery": own})
    rows.append({"step": 9, "alpha": 10, "recovery": 1.0})  # a later checkpoint does not count
    ev = {"ran": ran, "scaling": rows, "reason": "off"}
    if efficiency is not None:  # accuracies (base, step 5, final): the α = 1 recovery when no α = 1 row
        acc0, acc5, accT = efficiency
        ev.update({"base": {"accuracy": acc0}, "checkpoints": [{"accuracy": acc5}, {"accuracy": accT}],
                   "efficiency": [{"step": 5, "accuracy": acc5}, {"step": 50, "accuracy": accT}]})
    return {"steps": [5, 9, 50], "eval": ev}


def test_extrapolation_rule_edges():
    def answer(*args, **kwargs):
        return V.extrapolation(scaling_analysis(*args, **kwargs)).answer

    assert answer({2: 0.6}, own=0.1) == "yes"
    assert answer({2: 0.6, 3: 0.2}, own=0.1) == "yes"  # the best α counts
    assert answer({2: 0.6}, own=0.7) == "no"  # no better than the checkpoint
    assert answer({2: None}) == "unknown"  # final model gained nothing
    assert answer({2: 0.9}, ran=False) == "unknown"
    assert answer({}, own=0.2) == "unknown"  # no α > 1 at the earliest checkpoint (step 9's α = 10 is ignored)
    assert V.extrapolation({"steps": [1], "eval": {"ran": True, "scaling": []}}).answer == "unknown"


def test_extrapolation_thresholds_at_their_boundaries():
    # recovery ≥ 0.5: 0.5 itself passes, the next float below does not
    assert V.extrapolation(scaling_analysis({2: 0.5}, own=0.1)).answer == "yes"
    assert V.extrapolation(scaling_analysis({2: 0.49}, own=0.1)).answer == "no"
    # and strictly above the checkpoint's own recovery: equal is not enough
    assert V.extrapolation(scaling_analysis({2: 0.6}, own=0.6)).answer == "no"
    assert V.extrapolation(scaling_analysis({2: 0.6}, own=0.59)).answer == "yes"
    # without an α = 1 row the own recovery is (acc_5 − acc_0)/(acc_T − acc_0) = (0.5 − 0.25)/(0.75 − 0.25) = 0.5
    # (exact in binary): a best recovery of 0.5 ties it, 0.5625 beats it
    a = scaling_analysis({2: 0.5}, efficiency=(0.25, 0.5, 0.75))
    assert V.extrapolation(a).numbers["own_recovery"] == 0.5 and V.extrapolation(a).answer == "no"
    assert V.extrapolation(scaling_analysis({2: 0.5625}, efficiency=(0.25, 0.5, 0.75))).answer == "yes"
    # with neither, only the 0.5 floor applies
    assert V.extrapolation(scaling_analysis({2: 0.5})).answer == "yes"
    assert V.extrapolation(scaling_analysis({2: 0.5})).numbers["own_recovery"] is None


def magnitude_analysis(shares, shapes):
    """analysis.json with only what the concentration rule reads: per-type shares of ‖Δθ‖² at T."""
    return {"settings": {"types": list(shares)},
            "modules": {t: {"type": t, "shape": s} for t, s in shapes.items()},
            "magnitude": {"by_type": {t: {"share": [v]} for t, v in shares.items()}}}


def test_concentration_edges():
    # equal per-parameter energy in 3 types (up has 3x the parameters and 3x the share): lift 1 -> no
    a = V.concentration(magnitude_analysis({"q": 0.2, "k": 0.2, "up": 0.6}, {"q": (4, 4), "k": (4, 4), "up": (4, 12)}))
    assert a.answer == "no" and a.numbers["lift"] == pytest.approx(1.0)
    # all of it in one of 3 types: the top 2 hold 1, uniform 2/3, lift exactly 1.5 -> yes
    a = V.concentration(magnitude_analysis({"q": 1.0, "k": 0.0, "up": 0.0}, {"q": (4, 4), "k": (4, 4), "up": (4, 12)}))
    assert a.answer == "yes" and a.numbers["lift"] == pytest.approx(1.5)
    # with only k = 2 types (or fewer) the top 2 hold everything: no judgement
    assert V.concentration(magnitude_analysis({"q": 0.25, "up": 0.75}, {"q": (4, 4), "up": (4, 12)})).answer == "unknown"
    assert V.concentration(magnitude_analysis({"q": 1.0}, {"q": (4, 4)})).answer == "unknown"
    a = V.concentration(magnitude_analysis({"q": 0.0, "k": 0.0, "up": 0.0}, {"q": (4, 4), "k": (4, 4), "up": (4, 12)}))
    assert a.answer == "unknown" and "did not move" in a.text


def test_concentration_threshold_at_its_boundary():
    # 4 types of 16 parameters each: adjusted shares = raw shares, uniform share of the top 2 is 2/4,
    # so "yes" iff the top two hold ≥ 1.5 × 1/2 = 0.75 of the update
    shapes = {t: (4, 4) for t in ("q", "k", "v", "o")}

    def answer(shares):
        return V.concentration(magnitude_analysis(dict(zip(shapes, shares)), shapes))

    at = answer((0.375, 0.375, 0.125, 0.125))  # C = 0.75 exactly (binary fractions): lift 1.5
    assert at.numbers["lift"] == 1.5 and at.answer == "yes"
    above = answer((0.40, 0.36, 0.12, 0.12))  # C = 0.76: lift 1.52
    assert above.numbers["lift"] == pytest.approx(1.52) and above.answer == "yes"
    below = answer((0.37, 0.37, 0.13, 0.13))  # C = 0.74: lift 1.48
    assert below.numbers["lift"] == pytest.approx(1.48) and below.answer == "no"
    assert below.numbers["top_types"] == ["q", "k"]


def spectrum_analysis(fracs, locks, T=100, captured=None, svd_q=None):
    """analysis.json with only what the lock-in rule reads: one module per entry of ``fracs``
    (effective-rank fractions at T) and ``locks`` (lock-in steps), checkpoints at 1 ... T."""
    names = [f"m{i}" for i in range(len(fracs))]
    spec = {n: {"effective_rank_frac": [f], "effective_rank": [100 * f]} for n, f in zip(names, fracs)}
    if captured is not None:
        for n in names:
            spec[n]["captured_energy"] = [captured]
    return {"steps": [1, T // 2, T],
            "modules": {n: {"shape": [100, 100], **({"svd_q": svd_q} if svd_q else {})} for n in names},
            "spectrum": {"per_module": spec},
            "alignment": {"per_module": {n: {"lock_in_step": s} for n, s in zip(names, locks)}}}


def test_lock_in_thresholds_at_their_boundaries():
    def answer(*args, **kwargs):
        return V.lock_in(spectrum_analysis(*args, **kwargs)).answer

    # effective rank strictly below 0.25 of min(m, n); lock-in at most 25 of T = 100 steps
    assert answer([0.24], [25]) == "yes"
    assert answer([0.25], [25]) == "no"  # rank at the threshold is not low
    assert answer([0.24], [26]) == "no"  # lock-in one step late
    # the medians decide: ranks (0.1, 0.1, 0.9) have median 0.1 (mean 0.37); locks (1, 20, 90) median 20
    assert answer([0.1, 0.1, 0.9], [1, 20, 90]) == "yes"
    assert answer([0.1, 0.3, 0.3], [1, 2, 3]) == "no"
    assert answer([0.1, 0.1, 0.1], [1, 30, 90]) == "no"
    # a module with no lock-in step is left out of the median; none at all: unknown
    assert answer([0.1, 0.1], [None, 10]) == "yes"
    assert answer([0.1], [None]) == "unknown"
    # a truncated spectrum (q = 10 < 100) must hold ≥ 0.9 of ‖ΔW‖² for a low rank to count
    assert answer([0.05], [1], captured=0.9, svd_q=10) == "yes"
    assert answer([0.05], [1], captured=0.89, svd_q=10) == "unknown"
    assert answer([0.05], [1], captured=0.5) == "yes"  # exact SVD (no svd_q): the captured share is not read
    assert answer([0.05], [30], captured=0.5, svd_q=10) == "no"  # late lock-in decides without the rank
    # a direction fixed from the first checkpoint locks in at step 1 of 100: 1% of training
    a = V.lock_in(spectrum_analysis([0.05, 0.05], [1, 1]))
    assert a.answer == "yes" and a.numbers["lock_frac"] == 0.01


def test_a_trainer_output_dir_gives_training_curves(tmp_path):
    """A transformers/TRL Trainer's output_dir (no metrics.jsonl): the newest checkpoint-N's
    trainer_state.json log history becomes the training curves, under effopd's metric names."""
    out = tmp_path / "trl-run"
    history = [{"step": s, "epoch": s / 40, "loss": 1.0 / s, "learning_rate": 1e-5, "reward": s / 20,
                "completions/mean_length": 30 + s, "kl": 0.1} for s in range(1, 21)]
    history += [{"step": 10, "eval_loss": 0.5}, {"step": 20, "eval_loss": 0.4}]
    history += [{"step": 16, "extrapolate/s0": 0.5, "extrapolate/best": 0.6, "extrapolate/accepted_c": 3.0,
                 "extrapolate/candidates": [3.0, 5.0], "extrapolate/scores": [0.6, 0.55], "extrapolate/seconds": 1.0}]
    for step, upto in ((10, 10), (20, 23)):  # the older checkpoint holds a shorter history
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"log_history": history[:upto]}))
    loaded = load_run(out)
    assert loaded.series("train/reward") == (list(range(1, 21)), [s / 20 for s in range(1, 21)])
    assert loaded.series("eval/loss") == ([10, 20], [0.5, 0.4])
    assert loaded.series("trl/kl") == ([], []) and loaded.series("train/kl")[0] == list(range(1, 21))
    assert "checkpoint-20" in loaded.metrics_note and "20 steps" in loaded.metrics_note
    assert loaded.series("extrapolate/accepted_c") == ([16], [3.0])  # EffOPDCallback's searches keep their names
    html = build_report([out], tmp_path / "r.html").read_text()
    assert "No training curves" not in html and "a transformers/TRL Trainer run" in html
    assert "EffOPD not enabled" not in html
