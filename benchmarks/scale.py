"""Memory and time of one OPD step at Qwen3-0.6B's shape and vocabulary (V = 151,936): effopd's
scoring and rollout against a re-implementation of the path that materializes full logits.

Reproduce (CI-class machine, 2 cores, 24 GiB: one repeat of both paths took 38 minutes, almost all
of it the two 1024-token rollouts at ~0.5-1.2 s per token; see benchmarks/RESULTS.md)::

    python benchmarks/scale.py --repeats 1 --out benchmarks/results/scale.json

Smoke test (seconds)::

    python benchmarks/scale.py --layers 2 --tokens 64 --repeats 1 --out /tmp/scale_tiny.json

Models. Student and teacher are two random initializations (``--student-seed``, ``--teacher-seed``)
of a ``transformers.Qwen3Config`` written below with Qwen3-0.6B's shape: 28 layers, hidden 1024,
MLP 3072, 16 query / 8 key-value heads of dim 128, vocabulary 151,936, tied embeddings
(596,049,920 parameters, 2.38 GB in float32 each). Nothing is downloaded. float32 on the CPU.
``--layers`` shrinks the depth for a quick check only. Token ids come from effopd's embedded
tokenizer (27 ids, all < V; only the ids matter); the two fixed prompts are ``--prompt``'s.
Random models essentially never sample EOS (id 2, probability ~1/V per token), so both responses
run to ``--tokens`` T; the response lengths are recorded.

One OPD step on B = 2 prompts, in this order: (1) rollout: the student samples T tokens per
prompt (HF ``generate``, KV cache, temperature 1, top-p 1); (2) scoring: the teacher's logprob of
every sampled token, without grad; (3) update: the student's logprobs with grad, the OPD loss
(``ppo_clip_loss`` at ratio 1 on advantages lp_T - lp_old, token-mean), backward, grad-norm clip,
AdamW step (lr 1e-5, the package defaults).

Paths. Each measurement runs in a fresh child process (``--repeats`` times per path, the paths
alternating and swapping which goes first every repeat; seeds fixed, so both paths sample the
same tokens, which is checked by a hash of the sampled ids):

- ``naive``: the code path that keeps full logits, re-implemented here: ``generate`` with
  ``output_logits=True, return_dict_in_generate=True``, the per-step logits stacked to (B, T, V)
  float32 for ``log_softmax`` + ``gather`` (the sampler's logprobs), with the sampling settings
  effopd's ``generate`` passes (top-k off, no repetition penalty; the older code left top-k unset,
  so ``generate`` filled in a default top-k, a sampling difference that has nothing to do with
  memory and would make the two paths sample different tokens); scoring by one forward with
  ``logits_to_keep=T+1``, ``.float()``, a full ``log_softmax`` and ``gather``, for the teacher
  (no grad) and for the student (with grad). Loss, clipping and AdamW as in the trainer.
- ``effopd``: the trainer's own pieces, unmodified: ``effopd.methods.METHODS["opd"].assemble``
  (which calls ``effopd.rollout.generate``), then ``effopd.train.optimize`` (``method.prepare`` =
  teacher scoring by ``effopd.scoring.score``, then ``accumulate_gradients`` -> the method's loss
  -> ``effopd.scoring.token_logprobs`` with grad and ``ppo_clip_loss``, then clip and
  ``optimizer.step``), on a ``Config`` from ``effopd.config.load_config`` with the package's
  defaults (only the batch size, T and the device are set), and an ``Accelerator`` as the
  trainer builds it.

Measured inside each child, after its imports: wall time of the three stages; the process's
peak resident set (``ru_maxrss``, and ``VmHWM`` from /proc/self/status) and its resident set
after both models and the optimizer are built (``rss_after_load``), so that
``step peak = peak - rss_after_load`` is the memory the step itself adds. A sampling thread
(every ``--sample-ms`` ms) also records the peak RSS of each stage: rollout, scoring, the
student's forward+backward, and the optimizer step (marked by a forward pre-hook on the student
and a step pre-hook on the optimizer, the same in both paths). The parent never imports torch, so
its own footprint does not enter the children's ``ru_maxrss``.

Agreement. In the first ``effopd`` child, after its measurements are taken, the same sampled ids
go through both scorers: the (updated) student's logprobs by the naive full-logits scorer and by
``effopd.scoring.token_logprobs``, and the teacher's naive logprobs against the step's own
``teacher_logp_BT`` (from ``effopd.scoring.score``); the max abs differences are recorded.

Reported: per path the median over repeats of every number; ratios effopd / naive of step peak,
total peak and time (rollout, scoring, update, total).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PATHS = ("naive", "effopd")
STAGES = ("rollout", "scoring", "update")
MiB = 1024 * 1024

# Qwen3-0.6B's shape (its config.json), with every weight random.
QWEN3_06B = dict(
    vocab_size=151_936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    hidden_act="silu",
    max_position_embeddings=40_960,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    tie_word_embeddings=True,
    attention_bias=False,
    attention_dropout=0.0,
    initializer_range=0.02,
    use_cache=True,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Memory and time of one OPD step (rollout, teacher scoring, student update) at "
                    "Qwen3-0.6B's shape and V = 151,936: effopd vs a full-logits re-implementation, "
                    "each in its own fresh subprocess.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--layers", type=int, default=QWEN3_06B["num_hidden_layers"],
                   help="decoder layers (28 = Qwen3-0.6B; fewer only for a quick check)")
    p.add_argument("--tokens", type=int, default=1024, help="new tokens T per response")
    p.add_argument("--batch", type=int, default=2, help="prompts B")
    p.add_argument("--repeats", type=int, default=3, help="child processes per path (median reported)")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS), help="paths to run")
    p.add_argument("--prompt", nargs="+", default=["What is 12+34-5?", "Compute 7*8+9."],
                   help="prompts, cycled to --batch")
    p.add_argument("--student-seed", type=int, default=0)
    p.add_argument("--teacher-seed", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="torch seed before the rollout (sampling)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the children (0 = torch's default)")
    p.add_argument("--sample-ms", type=float, default=5.0, help="RSS sampling interval of the per-stage peaks")
    p.add_argument("--no-check", action="store_true", help="skip the agreement check")
    p.add_argument("--random-responses", action="store_true",
                   help="skip generation: both paths score and train on the same random response ids of length --tokens "
                   "(measures scoring and the update alone, in minutes instead of the rollout's half hour)")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for both paths (e.g. train.logit_chunk=256); the naive path ignores chunking")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scale.json")
    p.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- memory probes (no torch needed) -------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def hwm_mib() -> float:
    return _status_kib("VmHWM") / 1024


def maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class StagePeaks:
    """Peak RSS per stage, sampled by a daemon thread from /proc/self/statm."""

    def __init__(self, interval_s: float):
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.interval = interval_s
        self.stage = "load"
        self.peaks: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * self.page / MiB
        with self.lock:
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), rss)

    def _loop(self) -> None:
        while not self.stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def set(self, stage: str) -> None:
        self._sample()
        with self.lock:
            self.stage = stage
        self._sample()

    def close(self) -> dict[str, float]:
        self._sample()
        self.stop.set()
        self.thread.join()
        return dict(self.peaks)


# ---- the child: one path, one step ------------------------------------------------------------------


def child(args: argparse.Namespace) -> dict:
    t_start, load_start = time.time(), os.getloadavg()
    import gc
    import hashlib

    import torch
    import transformers
    from accelerate import Accelerator
    from transformers import Qwen3Config, Qwen3ForCausalLM, get_scheduler

    import effopd
    from effopd.config import load_config
    from effopd.models import freeze, load_tokenizer
    from effopd.train import mixed_precision

    if args.threads:
        torch.set_num_threads(args.threads)
    rss_imports = rss_mib()
    peaks = StagePeaks(args.sample_ms / 1000)

    # models, tokenizer, config, optimizer: what the trainer holds before its first step
    tok = load_tokenizer("embedded")
    mcfg = Qwen3Config(**{**QWEN3_06B, "num_hidden_layers": args.layers},
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    assert max(tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, len(tok) - 1) < mcfg.vocab_size
    t0 = time.time()
    torch.manual_seed(args.student_seed)
    student = Qwen3ForCausalLM(mcfg).float().eval()  # eval(): as from_pretrained returns it to the trainer
    torch.manual_seed(args.teacher_seed)
    teacher = freeze(Qwen3ForCausalLM(mcfg).float())
    t_init = time.time() - t0
    n_params = sum(p.numel() for p in student.parameters())

    prompts = [args.prompt[i % len(args.prompt)] for i in range(args.batch)]
    T = args.tokens
    cfg = load_config(overrides=[*args.override, f"rollout.batch_size={args.batch}", f"rollout.max_new_tokens={T}",
                                 "train.device=cpu"])
    o = cfg.optim
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision(cfg, use_cpu=True))  # "no" on the CPU
    optimizer = torch.optim.AdamW(student.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    scheduler = get_scheduler(o.scheduler, optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=cfg.train.steps)
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)

    # stage marks, identical in both paths
    student.register_forward_pre_hook(lambda m, a: peaks.set("update_fwd_bwd") if torch.is_grad_enabled() else None)
    getattr(optimizer, "optimizer", optimizer).register_step_pre_hook(lambda opt, a, k: peaks.set("optimizer_step"))

    gc.collect()
    rss_load, maxrss_load = rss_mib(), maxrss_mib()
    peaks.set("rollout")
    torch.manual_seed(args.seed)

    times: dict[str, float] = {}
    given = random_rollout(tok, prompts, T, mcfg.vocab_size, args.seed) if args.random_responses else None
    if args.child == "naive":
        rollout, teacher_lp, stats = naive_step(cfg, accelerator, student, teacher, tok, prompts, optimizer, scheduler,
                                                peaks, times, given)
    else:
        rollout, teacher_lp, stats = effopd_step(cfg, accelerator, student, teacher, tok, prompts, optimizer, scheduler,
                                                 peaks, times, given)
    peak_maxrss, peak_hwm = maxrss_mib(), hwm_mib()
    stage_peaks = peaks.close()
    lengths = rollout.response_mask_BT.sum(-1).tolist()
    ids_hash = hashlib.sha1(rollout.response_ids_BT.cpu().numpy().tobytes()).hexdigest()[:16]

    out = {
        "path": args.child,
        "load_average_start_end": [load_start, os.getloadavg()],
        "seconds": {**times, "total": sum(times[s] for s in STAGES)},
        "rss_after_imports_mib": rss_imports,
        "rss_after_load_mib": rss_load,
        "maxrss_after_load_mib": maxrss_load,
        "peak_maxrss_mib": peak_maxrss,
        "peak_vmhwm_mib": peak_hwm,
        "step_peak_mib": peak_maxrss - rss_load,
        "stage_peak_rss_mib": {k: v for k, v in stage_peaks.items() if k != "load"},
        "stage_peak_above_load_mib": {k: v - rss_load for k, v in stage_peaks.items() if k != "load"},
        "response_lengths": lengths,
        "response_ids_sha1": ids_hash,
        "step_metrics": stats,
        "init_seconds": t_init,
        "parameters_per_model": n_params,
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "effopd": getattr(effopd, "__version__", "?")},
    }
    if args.check:
        out["agreement"] = agreement(cfg, student, teacher, rollout, teacher_lp)
    out["child_seconds"] = time.time() - t_start
    return out


def naive_generate(model, tokenizer, prompts, max_new_tokens, temperature, top_p):
    """The full-logits rollout: HF ``generate`` returns every step's (B, V) logits; they are
    stacked to (B, T, V) float32 and log-softmaxed for the sampler's own logprobs."""
    import torch
    from transformers import GenerationConfig

    from effopd.rollout import Rollout, response_mask

    with torch.no_grad():
        enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        # Sampling settings as effopd's generate sets them (top_k 0 = off, no repetition penalty), so
        # both paths sample the same tokens; the difference is output_logits and what is done with them.
        gen_cfg = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
            repetition_penalty=1.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id, return_dict_in_generate=True, output_logits=True, use_cache=True,
        )
        was_training = model.training
        model.eval()
        out = model.generate(**enc, generation_config=gen_cfg)
        model.train(was_training)
        P = enc["input_ids"].shape[1]
        response_ids_BT = out.sequences[:, P:]
        logits_BTV = torch.stack(out.logits, dim=1).float() / temperature
        logp_BT = torch.log_softmax(logits_BTV, -1).gather(-1, response_ids_BT.unsqueeze(-1)).squeeze(-1)
        mask_BT = response_mask(response_ids_BT, tokenizer.eos_token_id)
        response_ids_BT = torch.where(mask_BT.bool(), response_ids_BT, tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(response_ids_BT, skip_special_tokens=True)
        return Rollout(prompt_ids_BP=enc["input_ids"], prompt_mask_BP=enc["attention_mask"],
                       response_ids_BT=response_ids_BT, response_mask_BT=mask_BT, logp_BT=logp_BT * mask_BT,
                       texts=texts)


def naive_token_logprobs(model, rollout, temperature=1.0):
    """The full-logits scorer: one forward keeping the last T + 1 positions' logits, ``.float()``,
    a full (B, T, V) ``log_softmax`` and ``gather``. Differentiable when grad is enabled."""
    import torch

    ids_BL = torch.cat([rollout.prompt_ids_BP, rollout.response_ids_BT], dim=1)
    mask_BL = torch.cat([rollout.prompt_mask_BP, rollout.response_mask_BT], dim=1)
    pos_BL = (torch.cumsum(mask_BL, dim=1) - 1).clamp(min=0)
    T = rollout.response_ids_BT.shape[1]
    out = model(input_ids=ids_BL, attention_mask=mask_BL, position_ids=pos_BL, logits_to_keep=T + 1, use_cache=False)
    logits_BTV = out.logits[:, :-1].float()
    if temperature != 1.0:
        logits_BTV = logits_BTV / temperature
    logp_BT = torch.log_softmax(logits_BTV, dim=-1).gather(-1, rollout.response_ids_BT.unsqueeze(-1)).squeeze(-1)
    return logp_BT * rollout.response_mask_BT


def random_rollout(tok, prompts, T, vocab_size, seed):
    """The prompts followed by T random response tokens each (no EOS among them), all unmasked."""
    import torch

    from effopd.rollout import Rollout

    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    g = torch.Generator().manual_seed(seed)
    special = {tok.pad_token_id, tok.eos_token_id, tok.bos_token_id}
    ids = torch.randint(0, vocab_size, (len(prompts), T), generator=g)
    ids = torch.where(torch.isin(ids, torch.tensor(sorted(x for x in special if x is not None))), ids + 1, ids) % vocab_size
    return Rollout(enc["input_ids"], enc["attention_mask"], ids, torch.ones_like(ids), torch.zeros(ids.shape),
                   ["" for _ in prompts])


def naive_step(cfg, accelerator, student, teacher, tok, prompts, optimizer, scheduler, peaks, times, given=None):
    import math

    import torch

    from effopd.losses import aggregation_denominator, opd_advantages, ppo_clip_loss

    r, lc = cfg.rollout, cfg.loss
    t0 = time.time()
    ro = given if given is not None else naive_generate(student, tok, prompts, r.max_new_tokens, r.temperature, r.top_p)
    times["rollout"] = time.time() - t0

    peaks.set("scoring")
    t0 = time.time()
    with torch.no_grad():
        teacher_lp = naive_token_logprobs(teacher, ro, r.temperature)
    times["scoring"] = time.time() - t0

    t0 = time.time()
    mask_BT = ro.response_mask_BT
    logp_BT = naive_token_logprobs(student, ro, r.temperature)
    old_BT = logp_BT.detach()
    adv_BT = opd_advantages(teacher_lp, old_BT, mask_BT)
    loss, m = ppo_clip_loss(logp_BT, old_BT, adv_BT, mask_BT, clip_eps_low=lc.clip_eps_low,
                            clip_eps_high=lc.clip_eps_high, dual_clip_c=lc.dual_clip_c, is_weight_BT=None,
                            agg=lc.aggregation, norm_len=r.max_new_tokens,
                            denominator=aggregation_denominator(mask_BT, lc.aggregation))
    accelerator.backward(loss)
    del logp_BT
    grad_norm = float(accelerator.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip or math.inf))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    times["update"] = time.time() - t0
    return ro, teacher_lp, {"loss": loss.item(), "grad_norm": grad_norm}


def effopd_step(cfg, accelerator, student, teacher, tok, prompts, optimizer, scheduler, peaks, times, given=None):
    from effopd.data.example import Example
    from effopd.methods import METHODS, Models
    from effopd.train import NonFiniteCount, optimize

    method = METHODS["opd"]
    models = Models(student=student, teacher=teacher, base=None, tokenizer=tok)
    examples = [Example(prompt=p, answer="0") for p in prompts]
    t0 = time.time()
    if given is not None:
        from effopd.methods import Batch

        batch = Batch(given, [e.answer for e in examples])
    else:
        batch = method.assemble(cfg, models, student, lambda k: examples[:k], len(prompts))
    times["rollout"] = time.time() - t0

    peaks.set("scoring")
    t0 = time.time()
    m = optimize(cfg, accelerator, models, method, batch, optimizer, scheduler, NonFiniteCount())
    total = time.time() - t0
    times["scoring"] = m["time/score"]
    times["update"] = total - m["time/score"]
    return batch.rollout, batch.signals["teacher_logp_BT"], {"loss": m["train/loss"], "grad_norm": m["train/grad_norm"]}


def agreement(cfg, student, teacher, rollout, teacher_lp) -> dict:
    """The same sampled ids through both scorers (after the step's measurements)."""
    import torch

    from effopd.scoring import token_logprobs

    t = cfg.rollout.temperature
    mask = rollout.response_mask_BT.bool()
    with torch.no_grad():
        s_naive = naive_token_logprobs(student, rollout, t)
        s_effopd = token_logprobs(student, rollout, t)
        t_naive = naive_token_logprobs(teacher, rollout, t)
    d_student = (s_naive - s_effopd).abs()[mask].max().item()
    d_teacher = (t_naive - teacher_lp).abs()[mask].max().item()
    return {
        "student_max_abs_diff": d_student,
        "teacher_max_abs_diff": d_teacher,
        "tokens_compared": int(mask.sum()),
        "student_logp_mean": s_naive[mask].mean().item(),
        "teacher_logp_mean": t_naive[mask].mean().item(),
        "tolerance": 1e-4,
        "ok": bool(max(d_student, d_teacher) < 1e-4),
    }


# ---- the parent ---------------------------------------------------------------------------------------


def run_child(args: argparse.Namespace, path: str, check: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", path, "--child-out", str(out),
               "--layers", str(args.layers), "--tokens", str(args.tokens), "--batch", str(args.batch),
               "--student-seed", str(args.student_seed), "--teacher-seed", str(args.teacher_seed),
               "--seed", str(args.seed), "--threads", str(args.threads), "--sample-ms", str(args.sample_ms),
               "--prompt", *args.prompt]
        if args.random_responses:
            cmd.append("--random-responses")
        if args.override:
            cmd += ["--override", *args.override]
        if check:
            cmd.append("--check")
        t0 = time.time()
        proc = subprocess.run(cmd, text=True, capture_output=True)
        if proc.returncode != 0 or not out.exists():
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(f"child {path} failed with exit status {proc.returncode}")
        res = json.loads(out.read_text())
        res["process_seconds"] = time.time() - t0
        return res


def median(xs):
    return statistics.median(xs) if xs else None


def summarize(runs: list[dict]) -> dict:
    def med(key, sub=None):
        return median([r[key][sub] if sub else r[key] for r in runs])

    stages = sorted({k for r in runs for k in r["stage_peak_above_load_mib"]})
    return {
        "repeats": len(runs),
        "seconds": {k: med("seconds", k) for k in (*STAGES, "total")},
        "rss_after_load_mib": med("rss_after_load_mib"),
        "peak_maxrss_mib": med("peak_maxrss_mib"),
        "step_peak_mib": med("step_peak_mib"),
        "stage_peak_above_load_mib": {s: median([r["stage_peak_above_load_mib"][s] for r in runs
                                                 if s in r["stage_peak_above_load_mib"]]) for s in stages},
    }


def ratio(a, b):
    return a / b if a is not None and b else None


def table(summary: dict, paths: list[str]) -> str:
    rows = [
        ("rollout s", lambda s: s["seconds"]["rollout"], "{:.1f}"),
        ("scoring s", lambda s: s["seconds"]["scoring"], "{:.1f}"),
        ("update s", lambda s: s["seconds"]["update"], "{:.1f}"),
        ("total s", lambda s: s["seconds"]["total"], "{:.1f}"),
        ("RSS after load MiB", lambda s: s["rss_after_load_mib"], "{:.0f}"),
        ("peak RSS MiB", lambda s: s["peak_maxrss_mib"], "{:.0f}"),
        ("step peak (peak - load) MiB", lambda s: s["step_peak_mib"], "{:.0f}"),
    ]
    stages = [k for k in ("rollout", "scoring", "update_fwd_bwd", "optimizer_step")
              if all(k in summary[p]["stage_peak_above_load_mib"] for p in paths)]
    for st in stages:
        rows.append((f"  {st} peak - load MiB", lambda s, st=st: s["stage_peak_above_load_mib"][st], "{:.0f}"))
    head = ["", *paths] + (["effopd / naive"] if len(paths) == 2 else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, get, fmt in rows:
        vals = [get(summary[p]) for p in paths]
        cells = [name, *(fmt.format(v) for v in vals)]
        if len(paths) == 2:
            r = ratio(vals[1], vals[0])
            cells.append("" if r is None else f"{r:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        res = child(args)
        args.child_out.write_text(json.dumps(res, indent=2))
        return 0

    t_all = time.time()
    runs: dict[str, list[dict]] = {p: [] for p in args.paths}
    checked = args.no_check or "effopd" not in args.paths
    agreement_res = None
    for rep in range(args.repeats):
        order = list(args.paths) if rep % 2 == 0 else list(reversed(args.paths))
        for path in order:
            check = path == "effopd" and not checked
            res = run_child(args, path, check)
            if check:
                agreement_res, checked = res.pop("agreement"), True
            runs[path].append(res)
            s = res["seconds"]
            print(f"[repeat {rep + 1}/{args.repeats}] {path:6s} rollout {s['rollout']:.1f}s scoring {s['scoring']:.1f}s "
                  f"update {s['update']:.1f}s | after load {res['rss_after_load_mib']:.0f} MiB, peak "
                  f"{res['peak_maxrss_mib']:.0f} MiB (step {res['step_peak_mib']:.0f}) | lengths "
                  f"{res['response_lengths']} ids {res['response_ids_sha1']} | child {res['process_seconds']:.0f}s",
                  flush=True)
            if check:
                print(f"  agreement: {agreement_res}", flush=True)

    summary = {p: summarize(runs[p]) for p in args.paths}
    ratios = None
    if len(args.paths) == 2:
        n, e = summary["naive"], summary["effopd"]
        ratios = {
            "step_peak_mib": ratio(e["step_peak_mib"], n["step_peak_mib"]),
            "peak_maxrss_mib": ratio(e["peak_maxrss_mib"], n["peak_maxrss_mib"]),
            **{f"seconds_{k}": ratio(e["seconds"][k], n["seconds"][k]) for k in (*STAGES, "total")},
        }
    hashes = {p: sorted({r["response_ids_sha1"] for r in runs[p]}) for p in args.paths}
    same_tokens = len({h for hs in hashes.values() for h in hs}) == 1
    first = next(iter(runs.values()))[0]
    result = {
        "benchmark": "one OPD step at Qwen3-0.6B shape: effopd chunked logprobs vs full logits",
        "command": "python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "shape": {**QWEN3_06B, "num_hidden_layers": args.layers},
        "parameters_per_model": first["parameters_per_model"],
        "batch": args.batch,
        "new_tokens": args.tokens,
        "prompts": [args.prompt[i % len(args.prompt)] for i in range(args.batch)],
        "seeds": {"student": args.student_seed, "teacher": args.teacher_seed, "sampling": args.seed},
        "repeats": args.repeats,
        "order": "paths alternate; the first path swaps every repeat",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch_threads": first["torch_threads"], **first["versions"]},
        "summary_median": summary,
        "ratios_effopd_over_naive": ratios,
        "targets": {"step_peak_ratio_max": 0.25, "time_ratio_max": 1.0},
        "same_sampled_tokens_across_paths": same_tokens,
        "response_ids_sha1": hashes,
        "agreement": agreement_res,
        "runs": runs,
        "wall_seconds": time.time() - t_all,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(f"one OPD step, B={args.batch}, T={args.tokens}, layers={args.layers}, V={QWEN3_06B['vocab_size']:,}, "
          f"{first['parameters_per_model']:,} parameters per model, median of {args.repeats}")
    print(table(summary, list(args.paths)))
    if agreement_res:
        print(f"agreement (student, same ids): max |naive - effopd| = {agreement_res['student_max_abs_diff']:.3g}; "
              f"teacher: {agreement_res['teacher_max_abs_diff']:.3g} over {agreement_res['tokens_compared']} tokens")
    print(f"same sampled tokens across paths: {same_tokens}")
    if ratios:
        step_ok = ratios["step_peak_mib"] <= 0.25
        time_ok = ratios["seconds_total"] <= 1.0
        print(f"step peak ratio {ratios['step_peak_mib']:.3f} (target <= 0.25: {'met' if step_ok else 'MISSED'}); "
              f"total time ratio {ratios['seconds_total']:.3f} (target <= 1: {'met' if time_ok else 'MISSED'})")
    print(f"wrote {args.out} ({time.time() - t_all:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
