"""The report's verdict: does a run show the paper's two foresight properties, and would EffOPD's
extrapolation pay off? Each answer is "yes", "no" or "unknown", with its number and threshold.

All three read ``analysis.json`` (schema in :mod:`effopd.analysis.run`) at its final checkpoint
T = ``steps[-1]``. The rules:

1. **Concentrated in few module types** (module-allocation foresight). Over the analysed module
   types (``settings.types``, by default attention and MLP), take each type's update energy
   per parameter, ``e_t = share_t / n_t`` (``share_t`` = the type's share of ‖Δθ‖² at T,
   ``n_t`` its parameter count), normalise to ``a_t = e_t / Σ e``, and add up the
   :data:`CONCENTRATION_TOP_K` largest: ``C``. If every parameter moved alike, ``C = k/K`` for
   k of K types; the answer is *yes* when ``C / (k/K) ≥`` :data:`CONCENTRATION_MIN_LIFT`.
   Dividing by the parameter count keeps a large type (the MLP matrices hold most parameters)
   from counting as "concentrated" by size alone.
2. **Early, low-rank lock-in** (update-direction foresight). *Yes* when both hold: the median
   over analysed modules of the effective-rank fraction ``exp(H(σ/Σσ)) / min(m, n)`` at T is
   below :data:`RANK_FRAC_MAX`, and the median lock-in step (first checkpoint from which the
   top-r subspace overlap with T stays ≥ the analysis' threshold) is at most
   :data:`LOCK_IN_MAX_FRAC` of T. When the spectra were truncated (randomized top-q SVD) and
   the median top-q spectrum holds less than :data:`MIN_CAPTURED_ENERGY` of ‖ΔW‖², a low
   effective rank cannot be told from the truncation, and that half is *unknown*.
3. **Extrapolation pays off**. For the earliest checkpoint of the weight-scaling analysis, the
   best recovery ``(acc_α − acc_0)/(acc_T − acc_0)`` over α > 1; *yes* when it is at least
   :data:`RECOVERY_MIN` and above the checkpoint's own recovery (α = 1). *Unknown* when the
   evaluation did not run or the final model gained nothing over the base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from effopd.report.load import Run, is_number
from effopd.utils import median

#: Question 1: how many of the largest types (by update per parameter) are added up ...
CONCENTRATION_TOP_K = 2
#: ... and how many times their uniform share k/K they must hold to count as concentrated.
CONCENTRATION_MIN_LIFT = 1.5
#: Question 2: the median effective rank must be below this fraction of min(m, n) ...
RANK_FRAC_MAX = 0.25
#: ... and the median lock-in step at most this fraction of the final step T.
LOCK_IN_MAX_FRAC = 0.25
#: Question 2: a truncated spectrum must hold at least this share of ‖ΔW‖² for a low effective
#: rank to count (below it, the rank half of the answer is "unknown").
MIN_CAPTURED_ENERGY = 0.9
#: Question 3: the best recovery at α > 1 of the earliest scaled checkpoint must reach this.
RECOVERY_MIN = 0.5

QUESTIONS = {
    "concentration": "Is the update concentrated in few module types?",
    "lock_in": "Does the update direction lock in early, and low-rank?",
    "extrapolation": "Would extrapolation (EffOPD) pay off?",
}


@dataclass
class Answer:
    key: str  # one of QUESTIONS
    answer: str  # "yes" | "no" | "unknown"
    text: str  # one or two sentences with the numbers and thresholds
    numbers: dict = field(default_factory=dict)  # the raw numbers, for tests and tables

    @property
    def question(self) -> str:
        return QUESTIONS[self.key]


def verdict(run: Run) -> list[Answer]:
    """The three answers for one run (all "unknown" without an analysis)."""
    a = run.analysis
    if a is None:
        why = "The parameter-dynamics analysis was not run, so this cannot be judged."
        return [Answer(k, "unknown", why) for k in QUESTIONS]
    answers = []
    for key, rule in (("concentration", concentration), ("lock_in", lock_in), ("extrapolation", extrapolation)):
        try:
            answers.append(rule(a))
        except Exception as e:  # a malformed analysis.json must not take the whole report down
            answers.append(Answer(key, "unknown", f"Could not be judged from analysis.json ({type(e).__name__}: {e})."))
    return answers


def recommendation(answers: list[Answer]) -> str:
    """One sentence: should the user switch EffOPD on?"""
    ans = {a.key: a.answer for a in answers}
    if ans["extrapolation"] == "yes":
        return "Extrapolating an early checkpoint recovers much of the final gain: EffOPD is likely to pay off (extrapolate.enabled=true)."
    if ans["extrapolation"] == "no":
        return "Extrapolating the earliest checkpoint did not recover enough of the final gain: EffOPD is unlikely to help this run."
    if ans["concentration"] == "yes" and ans["lock_in"] == "yes":
        return ("The update shows both foresight properties, the regime where EffOPD helps; run the analysis "
                "with evaluation to measure the weight-scaling recovery before switching it on.")
    return "Not enough evidence either way: analyse more (and earlier) checkpoints with evaluation."


def _sentence(s: str) -> str:
    return s[:1].upper() + s[1:]


def _pct(x) -> str:
    return f"{100 * x:.0f}%"


def concentration(a: dict) -> Answer:
    """Question 1 (see the module docstring)."""
    by_type = a.get("magnitude", {}).get("by_type", {})
    modules = a.get("modules", {})
    selected = a.get("settings", {}).get("types") or a.get("groups", {}).get("selected_types") or []
    params = {}
    for m in modules.values():
        if m.get("type") in selected and m.get("shape"):
            params[m["type"]] = params.get(m["type"], 0) + math.prod(m["shape"])
    shares = {}
    for t, n in params.items():
        s = (by_type.get(t, {}).get("share") or [None])[-1]
        if n > 0 and is_number(s):
            shares[t] = s
    K, k = len(shares), min(CONCENTRATION_TOP_K, len(shares))
    energy = {t: shares[t] / params[t] for t in shares}
    total = sum(energy.values())
    if K <= k or total <= 0:
        why = (f"only {K} module type(s) analysed" if K <= k else "the analysed modules did not move") + "; concentration cannot be judged."
        return Answer("concentration", "unknown", _sentence(why), {"types": K})
    adj = dict(sorted(((t, e / total) for t, e in energy.items()), key=lambda kv: -kv[1]))
    top = list(adj)[:k]
    C = sum(adj[t] for t in top)
    uniform = k / K
    lift = C / uniform
    raw = sum(shares[t] for t in top) / sum(shares.values())
    yes = lift >= CONCENTRATION_MIN_LIFT
    text = (f"The top {k} of {K} module types ({', '.join(top)}) take {_pct(C)} of the update per parameter, "
            f"{lift:.2f}× their uniform share of {_pct(uniform)} (threshold: ≥ {CONCENTRATION_MIN_LIFT:g}×); "
            f"they hold {_pct(raw)} of the raw ‖ΔW‖².")
    return Answer("concentration", "yes" if yes else "no", text,
                  {"top_types": top, "top_share": C, "uniform": uniform, "lift": lift, "raw_share": raw,
                   "adjusted_shares": adj, "threshold": CONCENTRATION_MIN_LIFT})


def lock_in(a: dict) -> Answer:
    """Question 2 (see the module docstring)."""
    steps = a.get("steps") or []
    spectrum = a.get("spectrum", {}).get("per_module", {})
    modules = a.get("modules", {})
    frac = median([(m.get("effective_rank_frac") or [None])[-1] for m in spectrum.values()])
    rank = median([(m.get("effective_rank") or [None])[-1] for m in spectrum.values()])
    truncated = [n for n in spectrum if truncated_svd(modules.get(n, {}))]
    captured = median([(spectrum[n].get("captured_energy") or [None])[-1] for n in truncated]) if truncated else 1.0
    align = a.get("alignment", {})
    locks = [m.get("lock_in_step") for m in align.get("per_module", {}).values()]
    lock = median(locks)
    T = steps[-1] if steps else None
    lock_frac = lock / T if lock is not None and T else None
    nums = {"rank_frac": frac, "effective_rank": rank, "lock_in_step": lock, "final_step": T, "lock_frac": lock_frac,
            "captured_energy": captured, "rank_threshold": RANK_FRAC_MAX, "lock_threshold": LOCK_IN_MAX_FRAC}

    parts, low, early = [], None, None
    if frac is None:
        parts.append("no effective ranks were computed")
    else:
        low = frac < RANK_FRAC_MAX
        absolute = f"{rank:.1f}" if rank is not None else "?"
        parts.append(f"median effective rank {absolute} = {_pct(frac)} of min(m, n) (threshold: < {_pct(RANK_FRAC_MAX)})")
        if low and captured is not None and captured < MIN_CAPTURED_ENERGY:
            low = None
            parts.append(f"but the truncated top-q spectra hold only {_pct(captured)} of ‖ΔW‖² (need ≥ {_pct(MIN_CAPTURED_ENERGY)}; "
                         "rerun the analysis with exact SVD)")
    if len(steps) < 2:
        parts.append("lock-in needs at least two checkpoints")
    elif lock_frac is None:
        parts.append("no module has a lock-in step")
    else:
        early = lock_frac <= LOCK_IN_MAX_FRAC
        parts.append(f"median lock-in at step {lock:g} = {_pct(lock_frac)} of the {T} steps analysed "
                     f"(threshold: ≤ {_pct(LOCK_IN_MAX_FRAC)}; earliest checkpoint: step {steps[0]})")
    if low is False or early is False:
        answer = "no"
    elif low and early:
        answer = "yes"
    else:
        answer = "unknown"
    return Answer("lock_in", answer, _sentence("; ".join(parts)) + ".", nums)


def truncated_svd(module: dict) -> bool:
    """Whether a module's spectrum is a randomized top-q one (q < min(m, n)), not the full one."""
    shape, q = module.get("shape"), module.get("svd_q")
    return bool(shape) and len(shape) == 2 and is_number(q) and q < min(shape)


def extrapolation(a: dict) -> Answer:
    """Question 3 (see the module docstring)."""
    ev = a.get("eval") or {}
    if not ev.get("ran"):
        reason = ev.get("reason") or "no evaluation results"
        return Answer("extrapolation", "unknown", f"The evaluation did not run ({reason}); rerun the analysis with an evaluation set.")
    rows = [r for r in ev.get("scaling") or [] if is_number(r.get("step")) and is_number(r.get("alpha"))]
    if not rows:
        return Answer("extrapolation", "unknown", "The analysis has no weight-scaling results.")
    step = min(r["step"] for r in rows)
    mine = [r for r in rows if r["step"] == step]
    above = [r for r in mine if r["alpha"] > 1 and is_number(r.get("recovery"))]
    T = (a.get("steps") or [None])[-1]
    where = f"step {step}" + (f" ({_pct(step / T)} of training)" if T else "")
    if not above:
        why = ("the final model gained nothing over the base, so recovery is undefined"
               if any(r.get("recovery") is None for r in mine) else "no α > 1 was evaluated")
        return Answer("extrapolation", "unknown", f"For the earliest scaled checkpoint, {where}, {why}.")
    best = max(above, key=lambda r: r["recovery"])
    own = _own_recovery(ev, mine, step)
    yes = best["recovery"] >= RECOVERY_MIN and (own is None or best["recovery"] > own)
    text = (f"Scaling the earliest checkpoint, {where}, by α = {best['alpha']:g} recovers {_pct(best['recovery'])} of the "
            f"final gain (threshold: ≥ {_pct(RECOVERY_MIN)})" + (f"; the checkpoint itself (α = 1) recovers {_pct(own)}" if own is not None else "") + ".")
    return Answer("extrapolation", "yes" if yes else "no", text,
                  {"step": step, "best_recovery": best["recovery"], "best_alpha": best["alpha"], "own_recovery": own,
                   "threshold": RECOVERY_MIN})


def _own_recovery(ev: dict, rows: list[dict], step) -> float | None:
    """Recovery of the checkpoint as trained: the α = 1 row, else from the efficiency results."""
    for r in rows:
        if r["alpha"] == 1 and is_number(r.get("recovery")):
            return r["recovery"]
    try:
        acc0 = ev["base"]["accuracy"]
        accT = ev["checkpoints"][-1]["accuracy"]
        acc = next(p["accuracy"] for p in ev["efficiency"] if p["step"] == step)
        return (acc - acc0) / (accT - acc0) if accT != acc0 else None
    except (KeyError, IndexError, TypeError, StopIteration):
        return None
