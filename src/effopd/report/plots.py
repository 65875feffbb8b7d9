"""The report's plots: one function per plot, taking runs and returning a matplotlib ``Figure``
(or None when the run lacks the data; the section then shows a note).

Figures are built with the object-oriented API (``matplotlib.figure.Figure``, rendered by Agg
when saved), so making a report never touches pyplot's global state or the user's backend.
Colours are fixed per run (overlaid plots) and per module type (within a run).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from effopd.module_groups import TYPES
import effopd.report.verdict as V
from effopd.report.load import Run, is_number
from effopd.utils import median

STYLE = {
    "font.size": 10, "axes.titlesize": 11, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
    "axes.spines.right": False, "legend.fontsize": 8.5, "legend.framealpha": 0.8, "image.cmap": "viridis",
}
_TAB10 = colormaps["tab10"]
TYPE_COLORS = {t: _TAB10(i % 10) for i, t in enumerate(TYPES)}
#: Training series with more points than this are drawn raw (faint) plus an EMA.
SMOOTH_ABOVE = 30
EMA_SPAN = 10


def run_color(i: int):
    return _TAB10(i % 10)


def mpl_text(s) -> str:
    """Text for matplotlib, with ``$`` escaped so labels are never parsed as mathtext."""
    return str(s).replace("$", r"\$")


def _figure(w: float, h: float) -> Figure:
    return Figure(figsize=(w, h), layout=ConstrainedLayoutEngine(w_pad=0.06, wspace=0.04))


def _fig(w: float, h: float, ncols: int = 1, nrows: int = 1, **kw):
    fig = _figure(w, h)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes.ravel()


def _two(w: float, h: float, stacked: bool, ratios=None, **kw):
    """A figure with two panels: side by side, or one above the other when ``stacked`` (the
    layout used when several runs share the page width)."""
    if stacked:
        return _fig(6.4, min(12.0, 1.7 * h), 1, 2, gridspec_kw={"height_ratios": ratios} if ratios else {}, **kw)
    return _fig(w, h, 2, 1, gridspec_kw={"width_ratios": ratios} if ratios else {}, **kw)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.45")
    ax.set_xticks([])
    ax.set_yticks([])


def _num(x) -> float:
    return float(x) if is_number(x) else math.nan


def _ema(values: list[float], span: int = EMA_SPAN) -> list[float]:
    a, out, m = 2 / (span + 1), [], None
    for v in values:
        m = v if m is None else a * v + (1 - a) * m
        out.append(m)
    return out


def module_label(a: dict, name: str) -> str:
    """``L3 q`` for a layer's module, the full name otherwise."""
    m = a.get("modules", {}).get(name, {})
    return f"L{m['layer']} {m['type']}" if m.get("layer") is not None and m.get("type") else name


def _type_order(a: dict, names) -> list[str]:
    """Module names sorted by type (in TYPES order), then layer."""
    mods = a.get("modules", {})
    rank = {t: i for i, t in enumerate(TYPES)}

    def key(n):
        m = mods.get(n, {})
        return rank.get(m.get("type"), len(rank)), m.get("layer") if m.get("layer") is not None else -1, n

    return sorted(names, key=key)


def modules_by_type(a: dict, names) -> dict[str, list[str]]:
    out = defaultdict(list)
    for n in _type_order(a, names):
        out[a.get("modules", {}).get(n, {}).get("type", "other")].append(n)
    return dict(out)


def _type_legend(ax, types, loc="best") -> None:
    ax.legend([Line2D([], [], color=TYPE_COLORS.get(t, "0.5"), lw=2) for t in types], types, loc=loc, ncol=2 if len(types) > 4 else 1)


# --- training ----------------------------------------------------------------------------------

TRAINING_PANELS = (("eval/accuracy", "eval accuracy"), ("train/reward", "train reward (mean verifiable reward)"),
                   ("train/reverse_kl", "reverse KL, student ‖ teacher"), ("train/response_length", "response length (tokens)"))


def training_curves(runs: list[Run]) -> Figure | None:
    """Eval accuracy, reward, reverse KL and response length vs step, all runs overlaid."""
    if not any(run.series(k)[0] for run in runs for k, _ in TRAINING_PANELS):
        return None
    fig, axes = _fig(10.5, 6.4, 2, 2)
    for ax, (key, title) in zip(axes, TRAINING_PANELS):
        drawn = False
        for i, run in enumerate(runs):
            steps, vals = run.series(key)
            if not steps:
                continue
            drawn, c, label = True, run_color(i), mpl_text(run.label)
            if len(vals) > SMOOTH_ABOVE:
                ax.plot(steps, vals, color=c, alpha=0.25, lw=0.8)
                ax.plot(steps, _ema(vals), color=c, lw=1.8, label=label)
            else:
                ax.plot(steps, vals, color=c, lw=1.6, marker="o", ms=3.5, label=label)
        ax.set_title(mpl_text(title))
        ax.set_xlabel("step")
        if not drawn:
            _empty(ax, f"{key} not logged")
    handles = [Line2D([], [], color=run_color(i), lw=2) for i in range(len(runs))]
    fig.legend(handles, [mpl_text(r.label) for r in runs], loc="outside upper center", ncol=min(len(runs), 6))
    return fig


# --- EffOPD search ----------------------------------------------------------------------------


def search_history(searches: list[dict], stacked: bool = False) -> Figure:
    """Scores of the candidate scales of every search, and the accepted scale per search."""
    fig, (ax, ax2) = _two(10.5, 3.8, stacked, [1.4, 1])
    cmap, n = colormaps["viridis"], len(searches)
    for j, rec in enumerate(searches):
        cands = [c for c in rec.get("candidates") or [] if is_number(c)]
        scores = [s for s in rec.get("scores") or [] if is_number(s)]
        xs, ys = [1.0], [_num(rec.get("s0"))]
        xs += cands[:len(scores)]
        ys += scores[:len(cands)]
        color = cmap(0.9 * j / max(1, n - 1))
        ax.plot(xs, ys, "-o", ms=3.5, color=color, lw=1.3, label=f"step {rec.get('step')}")
        c = rec.get("accepted_c")
        if is_number(c) and c != 1 and c in xs:
            ax.plot([c], [ys[xs.index(c)]], marker="*", ms=13, color=color, mec="black", mew=0.6, zorder=5)
    ax.set_xlabel("scale c of the update (1 = the trained weights)")
    ax.set_ylabel("validation score")
    ax.set_title("candidates per search (★ accepted)")
    if n <= 12:
        ax.legend(ncol=2 if n > 6 else 1)
    acc = [_num(r.get("accepted_c")) for r in searches]
    sec = [_num(r.get("seconds")) for r in searches]
    x = np.arange(n)
    bars = ax2.bar(x, [0 if math.isnan(a) else a for a in acc], color=[cmap(0.9 * j / max(1, n - 1)) for j in range(n)])
    for b, s in zip(bars, sec):
        if not math.isnan(s):
            ax2.annotate(f"{s:.0f}s" if s >= 10 else f"{s:.1f}s", (b.get_x() + b.get_width() / 2, b.get_height()),
                         ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax2.axhline(1, color="0.4", lw=0.8, ls="--")
    ax2.set_xticks(x, [str(r.get("step")) for r in searches], rotation=45 if n > 10 else 0)
    ax2.set_xlabel("search at step")
    ax2.set_ylabel("accepted c (1 = nothing accepted)")
    ax2.set_title("accepted scale (label: seconds spent)")
    return fig


# --- magnitude --------------------------------------------------------------------------------


def magnitude(run: Run, stacked: bool = False) -> Figure | None:
    """Layer × type heatmap of ‖ΔW‖/‖W_0‖ at the final checkpoint, and the share of the update
    by module type (raw ‖ΔW‖² and per parameter)."""
    a = run.analysis
    mag = a.get("magnitude") or {}
    hm = mag.get("heatmap") or {}
    by_type = mag.get("by_type") or {}
    if not by_type and not hm.get("layers"):
        return None
    fig, (ax, ax2) = _two(10.5, max(3.6, min(9.0, 1.4 + 0.22 * len(hm.get("layers") or []))), stacked, [1.15, 1])
    layers, types, rel = hm.get("layers") or [], hm.get("types") or [], hm.get("rel") or []
    if layers and types and rel:
        M = np.array([[_num(x) for x in row] for row in rel[-1]], dtype=float)
        im = ax.imshow(M, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_xticks(range(len(types)), types)
        every = max(1, math.ceil(len(layers) / 24))
        ax.set_yticks(range(0, len(layers), every), [str(l) for l in layers[::every]])
        ax.set_ylabel("layer")
        ax.grid(False)
        fig.colorbar(im, ax=ax, label="‖ΔW‖ / ‖W₀‖", shrink=0.9)
        if M.size <= 96:
            hi = np.nanmax(M) if np.isfinite(M).any() else 1.0
            for (i, j), v in np.ndenumerate(M):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 * hi else "black")
        ax.set_title(f"relative update per layer and type (step {a.get('steps', ['?'])[-1]})")
    else:
        _empty(ax, "no layer × type heatmap in analysis.json")
    tnames = [t for t in TYPES if t in by_type]
    raw = [_num((by_type[t].get("share") or [None])[-1]) for t in tnames]
    adj = V.concentration(a).numbers.get("adjusted_shares", {})
    x = np.arange(len(tnames))
    ax2.bar(x - 0.2, [0 if math.isnan(v) else v for v in raw], 0.4, label="share of ‖Δθ‖²", color="#4c72b0")
    ax2.bar(x + 0.2, [adj.get(t, 0.0) for t in tnames], 0.4, label="share per parameter (verdict)", color="#dd8452")
    ax2.set_xticks(x, tnames, rotation=40 if len(tnames) > 6 else 0)
    ax2.set_ylabel("share of the update")
    ax2.set_title("update share by module type")
    ax2.legend()
    return fig


# --- spectrum ---------------------------------------------------------------------------------


def spectrum(run: Run, stacked: bool = False) -> Figure | None:
    """Normalised singular-value spectra of the final updates, and the effective-rank fraction
    over checkpoints per module type."""
    a = run.analysis
    per = (a.get("spectrum") or {}).get("per_module") or {}
    if not per:
        return None
    steps = a.get("steps") or []
    mods = a.get("modules", {})
    groups = modules_by_type(a, per)
    fig, (ax, ax2) = _two(10.5, 3.9, stacked)
    drawn = False
    for t, names in groups.items():
        for n in names:
            S = run.tensor(f"singular_values/{n}")
            shape = mods.get(n, {}).get("shape") or []
            if S is None or S.ndim != 2 or len(shape) != 2 or not S[-1][0] > 0:
                continue
            s = S[-1][S[-1] > 0]
            ax.plot(np.arange(1, len(s) + 1) / min(shape), s / s[0], color=TYPE_COLORS.get(t, "0.5"), alpha=0.55, lw=0.9)
            drawn = True
    if drawn:
        ax.set_yscale("log")
        ax.set_xlabel("singular value index i / min(m, n)")
        ax.set_ylabel("σᵢ / σ₁")
        ax.set_title(f"spectra of ΔW at step {steps[-1] if steps else '?'}")
        _type_legend(ax, list(groups), loc="upper right")
    else:
        _empty(ax, "singular values not available (tensors.safetensors)")
    for t, names in groups.items():
        med = [_median_at(per, names, "effective_rank_frac", i) for i in range(len(steps))]
        ax2.plot(steps, med, "-o", ms=3.5, color=TYPE_COLORS.get(t, "0.5"), label=t)
    ax2.axhline(V.RANK_FRAC_MAX, color="0.3", ls="--", lw=1)
    ax2.annotate("verdict threshold", (steps[0] if steps else 0, V.RANK_FRAC_MAX), fontsize=8, color="0.3",
                 xytext=(2, 3), textcoords="offset points")
    ax2.set_ylim(0, None)
    ax2.set_xlabel("checkpoint step")
    ax2.set_ylabel("effective rank / min(m, n)")
    ax2.set_title("effective-rank fraction (median per type)")
    return fig


def _median_at(per: dict, names, key: str, i: int) -> float:
    """Median over ``names`` of entry ``i`` of each module's ``key`` list; NaN (a gap in the line) when none has one."""
    vals = []
    for n in names:
        xs = per.get(n, {}).get(key) or []
        if i < len(xs):
            vals.append(xs[i])
    m = median(vals)
    return math.nan if m is None else m


# --- alignment --------------------------------------------------------------------------------


def alignment(run: Run, stacked: bool = False) -> Figure | None:
    """Module × step heatmap of the top-r subspace overlap with the final update (lock-in steps
    marked), and the share of modules locked in by each step."""
    a = run.analysis
    al = a.get("alignment") or {}
    per = al.get("per_module") or {}
    steps = a.get("steps") or []
    if not per or not steps:
        return None
    names = _type_order(a, per)
    M = np.array([[_num(x) for x in (per[n].get("overlap") or [])[:len(steps)]] + [math.nan] * (len(steps) - len(per[n].get("overlap") or []))
                  for n in names], dtype=float)
    h = min(12.0, max(3.6, 1.2 + 0.13 * len(names)))
    if stacked:
        fig, (ax, ax2) = _fig(6.4, h + 3.2, 1, 2, gridspec_kw={"height_ratios": [h, 3.2]})
    else:  # the line plot keeps a readable height next to a tall heatmap
        fig = _figure(10.5, h)
        gs = fig.add_gridspec(2, 2, width_ratios=[2.2, 1], height_ratios=[3.6, max(h - 3.6, 0.01)])
        ax, ax2 = fig.add_subplot(gs[:, 0]), fig.add_subplot(gs[0, 1])
    im = ax.imshow(M, aspect="auto", interpolation="nearest", vmin=0, vmax=1, cmap="viridis")
    ax.grid(False)
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=45 if len(steps) > 12 else 0)
    ax.set_xlabel("checkpoint step")
    if len(names) <= 48:
        ax.set_yticks(range(len(names)), [mpl_text(module_label(a, n)) for n in names], fontsize=7 if len(names) > 24 else 8)
    else:  # one tick per module-type block
        first = {}
        for i, n in enumerate(names):
            first.setdefault(a.get("modules", {}).get(n, {}).get("type", "?"), i)
        ax.set_yticks(list(first.values()), list(first))
    pos = {s: i for i, s in enumerate(steps)}
    pts = [(pos[per[n]["lock_in_step"]], i) for i, n in enumerate(names) if per[n].get("lock_in_step") in pos]
    if pts:
        ax.scatter(*zip(*pts), marker="|", s=max(20, 300 / max(1, len(names) / 10)), color="#ff4b4b", linewidths=2,
                   label="lock-in step")
        ax.legend(loc="lower left", fontsize=8)
    fig.colorbar(im, ax=ax, label=f"overlap with step {steps[-1]} (top-{al.get('rank', '?')})", shrink=0.9)
    ax.set_title(f"subspace overlap with the final update (lock-in: ≥ {al.get('threshold', 0.9)})")
    summ = al.get("summary") or {}
    for key, label, c in (("locked_share", "share of modules locked in", "#c44e52"), ("mean_overlap", "mean overlap", "#4c72b0"),
                          ("mean_u1_cos", "mean |cos(u₁, u₁(T))|", "#55a868")):
        ys = [_num(v) for v in summ.get(key) or []]
        if len(ys) == len(steps):
            ax2.plot(steps, ys, "-o", ms=3.5, color=c, label=label)
    ax2.axvline(V.LOCK_IN_MAX_FRAC * steps[-1], color="0.3", ls="--", lw=1)
    ax2.annotate(f"{V.LOCK_IN_MAX_FRAC:.0%} of T", (V.LOCK_IN_MAX_FRAC * steps[-1], 0.02), fontsize=8, color="0.3",
                 xytext=(3, 0), textcoords="offset points")
    ax2.set_ylim(0, 1.05)
    ax2.set_xlabel("checkpoint step")
    ax2.set_title("lock-in over training")
    ax2.legend(loc="lower right")
    return fig


# --- weight scaling ---------------------------------------------------------------------------


def scaling(run: Run, stacked: bool = False) -> Figure | None:
    """Recovery (acc_α − acc_0)/(acc_T − acc_0) against α, one line per early checkpoint."""
    a = run.analysis
    rows = [r for r in (a.get("eval") or {}).get("scaling") or [] if is_number(r.get("alpha")) and is_number(r.get("step"))]
    if not rows:
        return None
    T = (a.get("steps") or [None])[-1]
    fig, (ax,) = _fig(7.0, 3.9)
    for j, step in enumerate(sorted({r["step"] for r in rows})):
        pts = sorted((r["alpha"], _num(r.get("recovery"))) for r in rows if r["step"] == step)
        label = f"step {step}" + (f" ({step / T:.0%} of T)" if T else "")
        ax.plot(*zip(*pts), "-o", ms=4, color=run_color(j), label=label)
    ax.axhline(1, color="0.2", lw=0.9, label="final model")
    ax.axhline(0, color="0.6", lw=0.9)
    ax.axhline(V.RECOVERY_MIN, color="0.3", ls="--", lw=1, label=f"verdict threshold ({V.RECOVERY_MIN:.0%})")
    ax.axvline(1, color="0.5", ls=":", lw=1)
    ax.set_xlabel("α in θ₀ + α(θₜ − θ₀)   (1 = the checkpoint)")
    ax.set_ylabel("recovery of the final gain")
    ax.set_title("weight scaling of early checkpoints")
    ax.legend()
    return fig


# --- trajectories -----------------------------------------------------------------------------

TRAJECTORY_MODULES = 4


def trajectory(run: Run, stacked: bool = False) -> Figure | None:
    """Variance explained by the first principal components of each module's u₁ trajectory,
    and the PC1–PC2 path of the modules that moved most."""
    a = run.analysis
    traj = a.get("trajectory") or {}
    if not traj:
        return None
    fig, (ax, ax2) = _two(10.5, 3.9, stacked)
    groups = modules_by_type(a, traj)
    rng = np.random.default_rng(0)
    for k, (t, names) in enumerate(groups.items()):
        ve = [traj[n].get("variance_explained") or [] for n in names]
        pc1 = [v[0] for v in ve if v and is_number(v[0])]
        pc12 = [v[0] + v[1] for v in ve if len(v) > 1 and is_number(v[0]) and is_number(v[1])]
        ax.scatter(k + rng.uniform(-0.15, 0.15, len(pc1)), pc1, s=14, color=TYPE_COLORS.get(t, "0.5"))
        ax.scatter(k + rng.uniform(-0.15, 0.15, len(pc12)), pc12, s=14, facecolors="none", edgecolors=TYPE_COLORS.get(t, "0.5"))
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("variance explained")
    ax.set_title("u₁ trajectory: PC1 (●) and PC1+PC2 (○)")
    norms = (a.get("magnitude") or {}).get("per_module") or {}
    top = sorted(traj, key=lambda n: -_num((norms.get(n, {}).get("norm") or [0])[-1]) if norms.get(n) else 0)[:TRAJECTORY_MODULES]
    steps, drawn = a.get("steps") or [], False
    for j, n in enumerate(top):
        P = run.tensor(f"trajectory_pca/{n}")
        if P is None or P.ndim != 2 or P.shape[0] != len(steps):
            continue
        ok = np.isfinite(P).all(1)
        x = P[ok, 0]
        y = P[ok, 1] if P.shape[1] > 1 else np.zeros_like(x)
        ax2.plot(x, y, "-o", ms=3.5, color=run_color(j), label=mpl_text(module_label(a, n)))
        okst = [s for s, o in zip(steps, ok) if o]
        for i in (0, len(x) - 1) if len(x) else ():
            ax2.annotate(str(okst[i]), (x[i], y[i]), fontsize=7.5, xytext=(3, 3), textcoords="offset points")
        drawn = True
    if drawn:
        ax2.set_xlabel("PC1")
        ax2.set_ylabel("PC2")
        ax2.set_title("u₁ paths of the most-moved modules (labels: steps)")
        ax2.legend()
    else:
        _empty(ax2, "PCA coordinates not available (tensors.safetensors)")
    return fig


# --- functional contribution ------------------------------------------------------------------


def contribution(run: Run, stacked: bool = False) -> Figure | None:
    """Accuracy with only one group's update applied to the base, or only it removed from the
    final model, per module type and per layer window."""
    ev = run.analysis.get("eval") or {}
    con = ev.get("contribution") or {}
    types, windows = con.get("types") or {}, con.get("windows") or []
    if not types and not windows:
        return None
    base = _num((ev.get("base") or {}).get("accuracy"))
    final = _num(((ev.get("checkpoints") or [{}])[-1] or {}).get("accuracy"))
    fig, axes = _two(10.5, 3.7, stacked, None if stacked else [max(1, len(types)), max(1, len(windows))], sharey=True)
    tlabels = [t for t in TYPES if t in types] + [t for t in types if t not in TYPES]
    groups = (([types[t] for t in tlabels], tlabels, "module type"),
              (windows, [_window_label(w.get("layers")) for w in windows], "layer window"))
    for ax, (items, labels, xlabel) in zip(axes, groups):
        if not items:
            _empty(ax, f"no {xlabel} results")
            continue
        x = np.arange(len(items))
        ax.bar(x - 0.2, [_num((it.get("apply") or {}).get("accuracy")) for it in items], 0.4, color="#55a868", label="apply only this update")
        ax.bar(x + 0.2, [_num((it.get("remove") or {}).get("accuracy")) for it in items], 0.4, color="#c44e52", label="remove only this update")
        ax.axhline(base, color="0.5", ls="--", lw=1, label="base")
        ax.axhline(final, color="0.1", ls="--", lw=1, label="final")
        ax.set_xticks(x, labels, rotation=45 if len(items) > 8 else 0)
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel("accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncol=4)
    return fig


def _window_label(layers) -> str:
    if not layers:
        return "?"
    return f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}–{layers[-1]}"


# --- embedding shift --------------------------------------------------------------------------


def embedding(run: Run, stacked: bool = False) -> Figure | None:
    """Histogram of the per-row cosine between base and final token vectors."""
    names = list((run.analysis.get("embedding_shift") or {}))
    arrays = [(n, run.tensor(f"embedding_cos/{n}")) for n in names]
    arrays = [(n, A[-1][np.isfinite(A[-1])]) for n, A in arrays if A is not None and A.ndim == 2 and len(A)]
    if not arrays:
        return None
    fig, (ax,) = _fig(7.0, 3.4)
    lo = min(float(v.min()) for _, v in arrays if v.size) if any(v.size for _, v in arrays) else 0.0
    bins = np.linspace(min(lo, 0.999), 1.0, 41)
    for j, (n, v) in enumerate(arrays):
        ax.hist(v, bins=bins, histtype="step", lw=1.6, color=run_color(j), label=mpl_text(n))
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.set_xlabel("cos(row in W₀, row in W_T)")
    ax.set_ylabel("rows")
    ax.set_title("per-token shift of embedding rows (final checkpoint)")
    ax.legend()
    return fig


# --- efficiency -------------------------------------------------------------------------------


def efficiency(runs: list[Run]) -> Figure | None:
    """Accuracy against total update norm over checkpoints, all runs on one plot."""
    fig, (ax,) = _fig(7.5, 4.2)
    drawn = False
    for i, run in enumerate(runs):
        ev = (run.analysis or {}).get("eval") or {}
        pts = [p for p in ev.get("efficiency") or [] if is_number(p.get("total_norm")) and is_number(p.get("accuracy"))]
        if not ev.get("ran") or not pts:
            continue
        xs, ys = [p["total_norm"] for p in pts], [p["accuracy"] for p in pts]
        base = (ev.get("base") or {}).get("accuracy")
        if is_number(base):
            xs, ys = [0.0] + xs, [base] + ys
        ax.plot(xs, ys, "-o", ms=4, color=run_color(i), label=mpl_text(run.label))
        for p in pts:
            ax.annotate(str(p.get("step")), (p["total_norm"], p["accuracy"]), fontsize=7.5, color=run_color(i),
                        xytext=(3, -9), textcoords="offset points")
        drawn = True
    if not drawn:
        return None
    ax.set_xlabel("total update norm ‖θₜ − θ₀‖ (all tensors)")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy per unit of parameter movement (labels: steps)")
    ax.legend()
    return fig
