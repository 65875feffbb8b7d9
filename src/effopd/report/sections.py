"""The report's sections, in page order. Each ``section_*`` takes the runs and returns the HTML
body of its section; plots come from :mod:`.plots`, tables and notes from :mod:`.html`.

With several runs, per-run plots and tables stand side by side (one column per run); training
curves and the efficiency plot overlay all runs, since comparing them is their point.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from effopd.module_groups import TYPES
from effopd.report import plots
import effopd.report.verdict as V
from effopd.report.html import esc, figure, fmt, grid, image, note, pct, table
from effopd.report.load import Run, is_number
from effopd.utils import median

# (id, heading, function name): the table of contents and the page order.
SECTIONS = (
    ("verdict", "Verdict", "section_verdict"),
    ("training", "Training curves", "section_training"),
    ("search", "EffOPD search history", "section_search"),
    ("magnitude", "Update magnitude by layer and module type", "section_magnitude"),
    ("spectrum", "Spectra and effective ranks", "section_spectrum"),
    ("alignment", "Alignment over training and lock-in", "section_alignment"),
    ("scaling", "Weight scaling (foresight)", "section_scaling"),
    ("trajectory", "Update-direction trajectories", "section_trajectory"),
    ("contribution", "Functional contribution", "section_contribution"),
    ("reconstruction", "Low-rank reconstruction", "section_reconstruction"),
    ("embedding", "Embedding shift", "section_embedding"),
    ("efficiency", "Efficiency: accuracy vs update norm", "section_efficiency"),
    ("config", "Config", "section_config"),
)
SECTION_IDS = tuple(s[0] for s in SECTIONS)


def _labels(runs: list[Run]) -> list[str] | None:
    return [r.label for r in runs] if len(runs) > 1 else None


def _analysis_missing(run: Run) -> str | None:
    return None if run.analysis is not None else note(run.analysis_note or "Analysis not run.")


def _eval_missing(run: Run) -> str | None:
    if (m := _analysis_missing(run)) is not None:
        return m
    ev = run.analysis.get("eval") or {}
    if ev.get("ran"):
        return None
    return note(f"Evaluation did not run ({ev.get('reason', 'no reason recorded')}): analyses 2, 3, 5, 7 need it; "
                "rerun the analysis with an evaluation set.")


def per_run_figure(runs: list[Run], plot: Callable, caption: str, missing: str, gate: Callable = _analysis_missing) -> str:
    """One plot per run, side by side, under one caption; notes where a run lacks the data."""
    cells, drawn = [], False
    for run in runs:
        if (cell := gate(run)) is None:
            fig = plot(run, stacked=len(runs) > 1)
            cell = image(fig, f"{caption} ({run.label})") if fig is not None else note(missing)
            drawn |= fig is not None
        cells.append(cell)
    if drawn:
        return figure(cells, caption, _labels(runs))
    return grid(cells, _labels(runs))


def _quiet(gate: Callable) -> Callable:
    """A gate that hides a run whose data is missing (for a table under a plot that already
    carries the note)."""
    return lambda run: "" if gate(run) is not None else None


def per_run_block(runs: list[Run], block: Callable, gate: Callable = _quiet(_analysis_missing)) -> str:
    """Per-run HTML (tables, notes) side by side; nothing when every run lacks the data."""
    cells = [c if (c := gate(r)) is not None else block(r) for r in runs]
    return grid(cells, _labels(runs)) if any(cells) else ""


# --- verdict ----------------------------------------------------------------------------------


def section_verdict(runs: list[Run]) -> str:
    answers = {id(r): V.verdict(r) for r in runs}
    head = "<tr><th class=\"l\">question</th>" + "".join(f"<th class=\"l\">{esc(r.label)}</th>" for r in runs) + "</tr>"
    body = ""
    for i, q in enumerate(V.QUESTIONS.values()):
        cells = "".join(f'<td><span class="badge {a.answer}">{esc(a.answer)}</span> {esc(a.text)}</td>'
                        for a in (answers[id(r)][i] for r in runs))
        body += f"<tr><th class=\"l\">{esc(q)}</th>{cells}</tr>"
    body += "<tr><th class=\"l\">Switch EffOPD on?</th>" + "".join(
        f'<td class="rec">{esc(V.recommendation(answers[id(r)]))}</td>' for r in runs) + "</tr>"
    rules = (
        f"Rules (computed at the final analysed checkpoint T): (1) the {V.CONCENTRATION_TOP_K} module types with the most update "
        f"per parameter hold at least {V.CONCENTRATION_MIN_LIFT:g}× their uniform share; (2) the median effective rank is below "
        f"{V.RANK_FRAC_MAX:.0%} of min(m, n) and the median lock-in step at most {V.LOCK_IN_MAX_FRAC:.0%} of T; (3) scaling "
        f"the earliest checkpoint by some α > 1 recovers at least {V.RECOVERY_MIN:.0%} of the final gain, more than the "
        "checkpoint itself. Thresholds are constants in effopd.report.verdict."
    )
    return f'<div class="scroll"><table class="verdict">{head}{body}</table></div><p>{esc(rules)}</p>' + _overview(runs)


def _overview(runs: list[Run]) -> str:
    rows = []
    for r in runs:
        steps, acc = r.series("eval/accuracy")
        secs = r.series("time/step")[1]
        searches = r.searches()
        rows.append([r.label, str(r.path), r.cfg("loss.method", "—"), _onoff(r.cfg("extrapolate.enabled")),
                     max((s for s in (x.get("step") for x in r.metrics) if is_number(s)), default="—"),
                     acc[0] if acc else None, acc[-1] if acc else None, max(acc) if acc else None,
                     sum(secs) if secs else None, len(searches),
                     "yes" if r.analysis is not None else "no"])
    return "<h3>Runs</h3>" + table(["run", "directory", "loss.method", "EffOPD", "last step", "first eval acc", "last eval acc",
                                    "best eval acc", "train seconds", "searches", "analysis"], rows, left=4)


def _onoff(x) -> str:
    return {True: "on", False: "off"}.get(x, "—")


# --- training ---------------------------------------------------------------------------------


def section_training(runs: list[Run]) -> str:
    notes = "".join(note(f"{r.label}: {r.metrics_note}") for r in runs if r.metrics_note)
    fig = plots.training_curves(runs)
    if fig is None:
        return notes + note("No training curves: no run logged eval/accuracy, train/reward, train/reverse_kl or train/response_length.")
    out = notes + figure([image(fig, "training curves")],
                         "Accuracy and reward should rise while the reverse KL to the teacher falls; thin lines are raw "
                         f"values and thick lines an EMA over {plots.EMA_SPAN} steps where a series is long.")
    return out + per_run_block(runs, _final_eval_table, gate=lambda r: None)


def _final_eval_table(run: Run) -> str:
    rows = [row for row in run.metrics if any(k.startswith("eval/") for k in row)]
    if not rows:
        return note("No eval/ metrics logged.")
    last = rows[-1]
    keys = sorted(k for k, v in last.items() if k.startswith("eval/") and is_number(v))
    first = rows[0]
    return (f"<h3>Evaluation at steps {esc(first.get('step'))} and {esc(last.get('step'))}</h3>"
            + table(["metric", f"step {first.get('step')}", f"step {last.get('step')}"],
                    [[k, first.get(k), last.get(k)] for k in keys]))


# --- EffOPD search ----------------------------------------------------------------------------


def section_search(runs: list[Run]) -> str:
    cells, drawn = [], False
    for r in runs:
        searches = r.searches()
        if not searches:
            enabled = r.cfg("extrapolate.enabled")
            cells.append(note("EffOPD enabled, but no search was logged yet." if enabled is True
                              else "EffOPD not enabled in this run (no extrapolate/ entries in metrics.jsonl)."))
            continue
        drawn = True
        cells.append(image(plots.search_history(searches, stacked=len(runs) > 1), f"EffOPD search history ({r.label})") + _search_table(r, searches))
    if not drawn:
        return grid(cells, _labels(runs))
    return figure(cells, "Left: validation score of each candidate scale per search (c = 1 is the trained weights, ★ the "
                  "accepted scale); right: the accepted scale per search, so a search that keeps accepting large c means the "
                  "update direction is stable.", _labels(runs))


def _search_table(run: Run, searches: list[dict]) -> str:
    rows = []
    for s in searches:
        cands, scores = s.get("candidates") or [], s.get("scores") or []
        tried = ", ".join(f"{fmt(c)}: {fmt(v)}" for c, v in zip(cands, scores)) or "—"
        rows.append([s.get("step"), s.get("s0"), tried, s.get("accepted_c"), s.get("best"), s.get("noise"),
                     s.get("update_norm"), s.get("seconds")])
    total = next((s["total_seconds"] for s in reversed(searches) if is_number(s.get("total_seconds"))), None)
    if total is None:
        total = sum(s["seconds"] for s in searches if is_number(s.get("seconds")))
    train = sum(run.series("time/step")[1])
    share = f" = {pct(total / train)} of the {fmt(train)} s of training" if train > 0 else ""
    return (table(["step", "s0", "candidate c: score", "accepted c", "best", "noise", "‖θ − anchor‖", "seconds"], rows, left=1)
            + f"<p>{len(searches)} searches took {esc(fmt(total))} s{esc(share)}.</p>")


# --- magnitude --------------------------------------------------------------------------------


def section_magnitude(runs: list[Run]) -> str:
    fig = per_run_figure(runs, plots.magnitude,
                         "Bright cells are the layers and module types the update moved most relative to their weights; "
                         "orange bars far above blue ones mark types that moved more per parameter than their size explains.",
                         "No update-magnitude results in analysis.json.")
    return fig + per_run_block(runs, _magnitude_table)


def _magnitude_table(run: Run) -> str:
    a = run.analysis
    by_type = (a.get("magnitude") or {}).get("by_type") or {}
    adj = V.concentration(a).numbers.get("adjusted_shares", {})
    params = {}
    for m in (a.get("modules") or {}).values():
        if m.get("shape"):
            params[m.get("type")] = params.get(m.get("type"), 0) + math.prod(m["shape"])
    rows = [[t, params.get(t), _last(by_type[t].get("norm")), _last(by_type[t].get("rel")), pct(_last(by_type[t].get("share"))),
             pct(adj[t]) if t in adj else "—"] for t in TYPES if t in by_type]
    total = _last((a.get("magnitude") or {}).get("total_norm"))
    return (f"<h3>By module type at step {esc(_last(a.get('steps')))} (total ‖Δθ‖ = {esc(fmt(total))})</h3>"
            + table(["type", "parameters", "‖ΔW‖", "‖ΔW‖/‖W₀‖", "share of ‖Δθ‖²", "share per parameter"], rows))


def _last(xs):
    return xs[-1] if isinstance(xs, list) and xs else None


# --- spectrum ---------------------------------------------------------------------------------


def section_spectrum(runs: list[Run]) -> str:
    fig = per_run_figure(runs, plots.spectrum,
                         "Spectra that drop fast and effective-rank fractions far below the dashed threshold mean a low-rank update; "
                         "the fraction of min(m, n) makes layers of different widths comparable.",
                         "No spectral results in analysis.json.")
    return fig + per_run_block(runs, _spectrum_table)


def _spectrum_table(run: Run) -> str:
    a = run.analysis
    per = (a.get("spectrum") or {}).get("per_module") or {}
    if not per:
        return note("No spectral results.")
    mods = a.get("modules") or {}
    fracs = [str(f) for f in (a.get("settings") or {}).get("fracs") or []]
    rows, truncated = [], 0
    for t, names in plots.modules_by_type(a, per).items():
        shapes = sorted({tuple(mods.get(n, {}).get("shape") or ()) for n in names})
        dims = sorted({min(s) for s in shapes if len(s) == 2})
        methods = sorted({str(mods.get(n, {}).get("svd_method")) for n in names})
        truncated += sum(1 for n in names if V.truncated_svd(mods.get(n, {})))
        rows.append([t, len(names), ", ".join("×".join(map(str, s)) for s in shapes), ", ".join(map(str, dims)),
                     _med(per, names, "effective_rank"), pct(_med(per, names, "effective_rank_frac")),
                     _med(per, names, "stable_rank"),
                     *[pct(_med_energy(per, names, f)) for f in fracs], ", ".join(methods)])
    out = (f"<h3>Per module type at step {esc(_last(a.get('steps')))} (medians over modules)</h3>"
           + table(["type", "modules", "shape m×n", "min(m, n)", "effective rank", "eff. rank / min(m, n)", "stable rank",
                    *[f"energy in top {float(f):.0%}" for f in fracs], "SVD"], rows))
    if truncated:
        out += note(f"{truncated} module(s) used a randomized top-q SVD: their effective rank is that of the top-q "
                    "approximation (at most q / min(m, n)); see the verdict for the energy the top-q spectrum holds.")
    return out


def _med(per: dict, names, key: str):
    return median(_last(per.get(n, {}).get(key)) for n in names)


def _med_energy(per: dict, names, frac: str):
    return median(_last((per.get(n, {}).get("energy_top") or {}).get(frac)) for n in names)


# --- alignment --------------------------------------------------------------------------------


def section_alignment(runs: list[Run]) -> str:
    fig = per_run_figure(runs, plots.alignment,
                         "Rows that turn bright (overlap near 1) in the first columns lock onto the final update direction "
                         "early; red ticks mark each module's lock-in step.",
                         "No alignment results in analysis.json.")
    return fig + per_run_block(runs, _lock_table)


def _lock_table(run: Run) -> str:
    a = run.analysis
    per = (a.get("alignment") or {}).get("per_module") or {}
    if not per:
        return note("No alignment results.")
    T = _last(a.get("steps"))
    rows = []
    for t, names in plots.modules_by_type(a, per).items():
        locks = [per[n].get("lock_in_step") for n in names]
        ok = [s for s in locks if is_number(s)]
        med = median(ok)
        rows.append([t, len(names), med, pct(med / T) if med is not None and T else "—", min(ok) if ok else None,
                     max(ok) if ok else None, len(locks) - len(ok)])
    return (f"<h3>Lock-in steps by module type (T = {esc(T)})</h3>"
            + table(["type", "modules", "median lock-in", "of T", "earliest", "latest", "no lock-in (zero update)"], rows))


# --- weight scaling ---------------------------------------------------------------------------


def section_scaling(runs: list[Run]) -> str:
    fig = per_run_figure(runs, plots.scaling,
                         "Lines that climb above the dashed threshold for α > 1 mean an early checkpoint, extrapolated along "
                         "its update, already recovers most of the final gain: the foresight EffOPD exploits.",
                         "No weight-scaling results.", gate=_eval_missing)
    return fig + per_run_block(runs, _scaling_table, gate=_quiet(_eval_missing))


def _scaling_table(run: Run) -> str:
    rows = [r for r in (run.analysis.get("eval") or {}).get("scaling") or [] if is_number(r.get("alpha"))]
    if not rows:
        return note("No weight-scaling results.")
    alphas = sorted({r["alpha"] for r in rows})
    steps = sorted({r["step"] for r in rows if is_number(r.get("step"))})
    cell = {(r["step"], r["alpha"]): r.get("recovery") for r in rows}
    return ("<h3>Recovery by step and α</h3>"
            + table(["step"] + [f"α = {a:g}" for a in alphas], [[s] + [cell.get((s, a)) for a in alphas] for s in steps]))


# --- trajectories -----------------------------------------------------------------------------


def section_trajectory(runs: list[Run]) -> str:
    def few(run):
        n = len(run.analysis.get("steps") or []) if run.analysis else 0
        return note(f"Only {n} checkpoint(s): trajectories are short; analyse at least 3 for a meaningful PCA.") if 0 < n < 3 else ""

    fig = per_run_figure(runs, plots.trajectory,
                         "A first component that explains nearly all the variance means u₁ moves along one line (a settled "
                         "direction being refined); the paths show where each top module's u₁ starts and ends.",
                         "No trajectory results in analysis.json.")
    return "".join(few(r) for r in runs) + fig


# --- functional contribution ------------------------------------------------------------------


def section_contribution(runs: list[Run]) -> str:
    return per_run_figure(runs, plots.contribution,
                          "A green bar near the final line means that group's update alone carries the gain; a red bar near "
                          "the base line means the model cannot do without it.",
                          "No functional-contribution results.", gate=_eval_missing)


# --- reconstruction ---------------------------------------------------------------------------


def section_reconstruction(runs: list[Run]) -> str:
    return per_run_block(runs, _reconstruction_table, gate=_eval_missing) or note("No reconstruction results.")


def _reconstruction_table(run: Run) -> str:
    ev = run.analysis.get("eval") or {}
    rows = ev.get("reconstruction") or []
    if not rows:
        return note("No reconstruction results.")
    final = (_last(ev.get("checkpoints")) or {}).get("accuracy")
    base = (ev.get("base") or {}).get("accuracy")
    return ("<p>Accuracy of the final model with every analysed update replaced by its norm-matched top-k% or bottom-k% "
            f"singular directions (base {esc(fmt(base))}, final {esc(fmt(final))}); a top-k% close to the final model means "
            "the gain lives in few directions.</p>"
            + table(["k% of singular values", "top k%", "bottom k%"],
                    [[f"{100 * r['frac']:g}%" if is_number(r.get("frac")) else "?", (r.get("top") or {}).get("accuracy"),
                      (r.get("bottom") or {}).get("accuracy")] for r in rows]))


# --- embedding shift --------------------------------------------------------------------------


def section_embedding(runs: list[Run]) -> str:
    fig = per_run_figure(runs, plots.embedding,
                         "Mass piled at cos = 1 means most token vectors did not move; the left tail shows the few tokens "
                         "whose representation the training changed.",
                         "Per-row cosines not available (tensors.safetensors).")
    return fig + per_run_block(runs, _embedding_table)


def _embedding_table(run: Run) -> str:
    shift = run.analysis.get("embedding_shift") or {}
    if not shift:
        return note("No embedding or lm_head matrices in the checkpoints.")
    keys = ("mean", "min", "q01", "q05", "q25", "median")
    rows = [[n, s.get("rows"), *[_last(s.get(k)) for k in keys], _last(s.get("rows_skipped"))] for n, s in shift.items()]
    return (f"<h3>cos(W₀ row, W_T row) at step {esc(_last(run.analysis.get('steps')))}</h3>"
            + table(["tensor", "rows", *keys, "zero rows skipped"], rows))


# --- efficiency -------------------------------------------------------------------------------


def section_efficiency(runs: list[Run]) -> str:
    notes = "".join(f"<p><b>{esc(r.label)}:</b></p>{m}" if len(runs) > 1 else m for r in runs if (m := _eval_missing(r)))
    fig = plots.efficiency(runs)
    if fig is None:
        return notes or note("No efficiency results.")
    rows = []
    for r in runs:
        ev = (r.analysis or {}).get("eval") or {}
        rows += [[r.label, p.get("step"), p.get("total_norm"), p.get("selected_norm"), p.get("accuracy")]
                 for p in ev.get("efficiency") or []]
    return notes + figure([image(fig, "efficiency")],
                          "A curve that rises more steeply reaches its accuracy with less parameter movement (OPD is expected to "
                          "sit above RL); point labels are checkpoint steps.") + table(
        ["run", "step", "‖Δθ‖ (all)", "‖Δθ‖ (analysed types)", "accuracy"], rows)


# --- config -----------------------------------------------------------------------------------


def section_config(runs: list[Run]) -> str:
    parts = []
    for r in runs:
        if r.config_text is None:
            parts.append(note(f"{r.label}: {r.path / 'config.yaml'} not found."))
            continue
        parts.append(f"<details><summary>{esc(r.label)}: config.yaml (loss.method = {esc(r.cfg('loss.method', '—'))}, "
                     f"EffOPD {esc(_onoff(r.cfg('extrapolate.enabled')))})</summary><pre>{esc(r.config_text)}</pre></details>")
        if r.analysis is not None:
            s = r.analysis.get("settings") or {}
            parts.append(f"<details><summary>{esc(r.label)}: analysis settings</summary><pre>"
                         + esc("\n".join(f"{k}: {v}" for k, v in s.items())) + "</pre></details>")
    return "".join(parts)
