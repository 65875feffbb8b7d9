"""`effopd analyze` (no eval) against the naive analysis of a synthetic Qwen-shaped model pair.

Reproduce (CI-class machine, 2 cores; takes roughly 10-20 minutes, ~6 GB in ``--workdir``)::

    OMP_NUM_THREADS=2 python benchmarks/analysis_speed.py --shape qwen0.5b --checkpoints 2 --repeats 3 \
        --out benchmarks/results/analysis_speed.json

Smoke test (seconds)::

    OMP_NUM_THREADS=1 python benchmarks/analysis_speed.py --shape tiny --repeats 1 \
        --out /tmp/analysis_speed_tiny.json

Data. A base model and N checkpoints (steps 10 … 100, so N=2 gives step 10 = "early" and step
100 = "final") are written once to ``--workdir`` (reused while their spec is unchanged), as
single-file ``model.safetensors`` + ``config.json`` directories. Shapes and names come from a
``transformers`` Qwen2 config instantiated on the meta device (``qwen0.5b`` is shaped like
Qwen2.5-0.5B: hidden 896, 24 layers, MLP 4864, 14 query / 2 key-value heads, vocab 151,936,
tied embeddings, q/k/v biases: 494,032,768 parameters, 1.98 GB in float32). Every tensor is
generated and written one at a time (a hand-written safetensors writer), in a child process, so
neither the generator nor this parent ever holds a model. Base weights: N(0, 0.02²) for
matrices and embeddings, 0 for biases, 1 for norms. Checkpoints follow the model of
:mod:`effopd.analysis.synthetic` (re-implemented here to stream: ``write_run`` keeps a full-size
update for every matrix plus a whole checkpoint in memory)::

    W_t = W_0 + (t/T)·D + ε_t,   D = Σ_{i≤k} (1/i)·a_i b_iᵀ scaled to ‖D‖_F = scale·‖W_0‖_F,

for every attention/MLP matrix (k = ``--update-rank``, default 16, so that the top r = 8
singular values effopd reports are distinct signal values, not noise-bulk values), ε_t i.i.d.
with per-entry RMS noise·‖D‖_F/√(mn); the first ``embed_rows`` embedding rows move too.

Variants. Each measurement runs in a fresh child process (``--repeats`` times each, the two
variants alternating); timing and memory are read inside the child, after its imports:

- ``effopd``: ``effopd.analysis.analyze(base, ckpts, out, eval_fn=None, progress=False)`` with
  the defaults (rank r = 8; exact SVD for min(m, n) ≤ 512, randomized top-q
  ``torch.svd_lowrank`` otherwise). It streams tensor by tensor and computes analyses 1, 4, 6,
  8, 9 for every checkpoint: norms of every ΔW, the top-q SVD of every attention/MLP ΔW,
  alignment, trajectories, embedding row cosines; and writes analysis.json + tensors.
- ``naive``: ``safetensors.torch.load_file`` of the whole base model, then for each checkpoint
  in turn the whole checkpoint (so at most two whole models are held: base + current
  checkpoint); for every tensor ΔW = W_t − W_0 and ‖ΔW‖_F, and for every attention/MLP matrix
  (the same set effopd decomposes; checked) the exact full ``torch.linalg.svd(ΔW,
  full_matrices=False)`` (U, S, Vᵀ), keeping the singular values. This is less work than
  effopd's (no alignment, trajectories, embedding analysis or output files), which favours the
  naive side.

Reported per variant: median wall time (seconds, the work only: no interpreter start-up or
imports), median peak resident memory of the child (``VmHWM`` from /proc/self/status: the
kernel's high-water mark of the child's own address space; ``ru_maxrss`` is recorded too, but
on Linux it also carries the high-water mark of the process image before ``exec``), and the
sampled peak of anonymous memory (``RssAnon`` every 10 ms, i.e. excluding file pages mapped by
safetensors). Note on what these count: ``safetensors`` (0.8 here) returns tensors backed by a
private mapping of the file, so reading a tensor adds its file pages to RSS (``RssFile``), not to
anonymous memory, and they stay resident as long as the file stays open. Peak RSS therefore
counts every model-file page a variant has mapped at once (naive: the base and the current
checkpoint; effopd: its ``CheckpointReader`` keeps every file open for the whole analysis), and
peak anon counts only what the computation allocates (ΔW, SVD workspaces, temporaries). Both
include the interpreter + torch baseline, recorded as ``rss_after_imports_mb``.
Ratios: speed-up = naive / effopd time, memory = effopd / naive peak. Accuracy:
effopd's top-r singular values (``tensors.safetensors`` ``singular_values/<name>``, every
checkpoint) against the naive exact ones: max over modules and checkpoints of
|σ̂_i − σ_i| / σ_i, i ≤ r. Targets: speed-up ≥ 5, memory ≤ 0.25, error ≤ 1e-3.

Torch threads are not set here: children inherit ``OMP_NUM_THREADS`` etc. from the environment.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from effopd.utils import median, write_json

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GENERATOR_VERSION = 1
T_FINAL = 100

SHAPES = {
    # Qwen2.5-0.5B (config.json of Qwen/Qwen2.5-0.5B)
    "qwen0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                     num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
                     rope_theta=1000000.0, tie_word_embeddings=True, hidden_act="silu"),
    # smoke-test size (~7M parameters); hidden 576 > 512 so that effopd's randomized SVD path runs
    "tiny": dict(hidden_size=576, intermediate_size=1152, num_hidden_layers=2, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=4096, max_position_embeddings=2048, rms_norm_eps=1e-6,
                 rope_theta=1000000.0, tie_word_embeddings=True, hidden_act="silu"),
}
TARGETS = {"speedup_min": 5.0, "memory_ratio_max": 0.25, "rel_err_max": 1e-3}


# --------------------------------------------------------------------------- memory probes

def _status() -> dict[str, int]:
    """/proc/self/status memory fields in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


class AnonSampler:
    """Background thread recording the peak of RssAnon (and VmRSS) every ``interval`` seconds."""

    def __init__(self, interval: float = 0.01):
        import threading

        self.interval, self.peak_anon, self.peak_rss = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        s = _status()
        self.peak_anon = max(self.peak_anon, s["RssAnon"])
        self.peak_rss = max(self.peak_rss, s["VmRSS"])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


MB = 2**20


# --------------------------------------------------------------------------- synthetic data (child)

def _config(shape: str):
    from transformers import Qwen2Config

    return Qwen2Config(**SHAPES[shape])


def _entries(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor ``save_pretrained`` would write (tied lm_head left out)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = set(getattr(model, "_tied_weights_keys", None) or ()) if config.tie_word_embeddings else set()
    return [(n, tuple(t.shape)) for n, t in model.state_dict().items() if n not in tied]


def _write_safetensors(path: Path, entries, dtype, make) -> None:
    """Write ``path`` tensor by tensor: header from ``entries`` first, then ``make(name)`` for each."""
    import torch

    code = {torch.float32: "F32", torch.bfloat16: "BF16"}[dtype]
    size = torch.tensor([], dtype=dtype).element_size()
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        n = math.prod(shape) * size
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in entries:
            t = make(name).to(dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"generator made {name} with shape {tuple(t.shape)}, expected {shape}")
            f.write(t.view(torch.uint8).numpy().data)
    os.replace(tmp, path)


def _gen(*key: int):
    import torch

    seed = 0
    for k in key:
        seed = (seed * 1_000_003 + k) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def generate(spec: dict, data: Path) -> None:
    """Write ``data/base`` and ``data/step-N`` for every step of ``spec`` (see the module docstring)."""
    import torch
    from safetensors import safe_open

    from effopd.module_groups import DEFAULT_TYPES, module_group

    config = _config(spec["shape"])
    dtype = getattr(torch, spec["dtype"])
    entries = _entries(config)
    index = {name: i for i, (name, _) in enumerate(entries)}
    shapes = dict(entries)
    seed, k, scale, noise = spec["seed"], spec["update_rank"], spec["scale"], spec["noise"]

    def base_tensor(name):
        shape = shapes[name]
        kind = module_group(name).type
        if kind == "norm":
            return torch.ones(shape)
        if name.endswith(".bias"):
            return torch.zeros(shape)
        return torch.randn(shape, generator=_gen(seed, index[name])) * 0.02

    base_dir = data / "base"
    base_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(base_dir)
    _write_safetensors(base_dir / "model.safetensors", entries, dtype, base_tensor)

    with safe_open(str(base_dir / "model.safetensors"), framework="pt", device="cpu") as base:
        for step in spec["steps"]:
            def ckpt_tensor(name, step=step):
                w0 = base.get_tensor(name).float()
                kind = module_group(name).type
                if w0.ndim != 2 or not name.endswith(".weight"):
                    return w0
                if kind == "embed":
                    g = _gen(seed, index[name], 1)
                    rows = min(spec["embed_rows"], w0.shape[0])
                    move = torch.randn(rows, w0.shape[1], generator=g) * (scale * float(w0.std()))
                    w0[:rows] += step / T_FINAL * move
                    return w0
                if kind not in DEFAULT_TYPES:
                    return w0
                m, n = w0.shape
                r = min(k, m, n)
                g = _gen(seed, index[name], 1)  # the same direction D at every step
                a, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
                b, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
                D = (a * (1.0 / torch.arange(1, r + 1, dtype=torch.float32))) @ b.T
                D *= scale * float(w0.norm()) / float(D.norm())
                eps = torch.randn(m, n, generator=_gen(seed, index[name], 2, step))
                eps *= noise * float(D.norm()) / math.sqrt(m * n)
                return w0 + step / T_FINAL * D + eps

            d = data / f"step-{step}"
            d.mkdir(parents=True, exist_ok=True)
            config.save_pretrained(d)
            _write_safetensors(d / "model.safetensors", entries, dtype, ckpt_tensor)


# --------------------------------------------------------------------------- measured work (child)

def run_effopd(job: dict) -> dict:
    from effopd.analysis import analyze

    rec = analyze(job["base"], [(s, p) for s, p in job["ckpts"]], job["out"], eval_fn=None, progress=False)
    return {"selected": rec["groups"]["selected"], "rank": rec["settings"]["rank"]}


def run_naive(job: dict) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    from effopd.module_groups import DEFAULT_TYPES, module_group

    base = load_file(str(Path(job["base"]) / "model.safetensors"))  # whole base model
    spectra: dict[str, list] = {}
    norms: dict[str, list[float]] = {}
    for _, path in job["ckpts"]:
        ck = load_file(str(Path(path) / "model.safetensors"))  # whole checkpoint
        for name, w0 in base.items():
            d = ck[name].float() - w0.float()
            norms.setdefault(name, []).append(float(d.norm()))
            if d.ndim == 2 and name.endswith(".weight") and module_group(name).type in DEFAULT_TYPES:
                U, S, Vh = torch.linalg.svd(d, full_matrices=False)  # exact, full
                spectra.setdefault(name, []).append(S)
                del U, Vh
            del d
        del ck
    save_file({f"singular_values/{n}": torch.stack(s) for n, s in spectra.items()}, job["out"])
    return {"selected": list(spectra)}


def child(kind: str, job_file: Path) -> None:
    job = json.loads(job_file.read_text())
    # every import of the measured code happens before the clock starts
    import resource

    import torch

    import effopd.analysis  # noqa: F401
    import safetensors.torch  # noqa: F401

    if kind == "generate":
        t0 = time.perf_counter()
        generate(job["spec"], Path(job["data"]))
        write_json(job["result"], {"wall_s": time.perf_counter() - t0}, indent=None)
        return
    work = {"effopd": run_effopd, "naive": run_naive}[kind]
    start = _status()
    with AnonSampler() as mem:
        t0 = time.perf_counter()
        info = work(job)
        wall = time.perf_counter() - t0
    end = _status()
    result = {
        "variant": kind,
        "wall_s": wall,
        "peak_rss_mb": end["VmHWM"] / MB,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB,
        "peak_anon_mb": mem.peak_anon / MB,
        "rss_after_imports_mb": start["VmRSS"] / MB,
        "torch_threads": torch.get_num_threads(),
        **info,
    }
    write_json(job["result"], result, indent=None)


def spawn(kind: str, job: dict, job_file: Path) -> dict:
    write_json(job_file, job, indent=None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(job_file)]
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"child {kind} failed with exit status {proc.returncode}: {' '.join(cmd)}")
    return json.loads(Path(job["result"]).read_text())


# --------------------------------------------------------------------------- parent

def accuracy(effopd_out: Path, naive_sv: Path, r: int) -> dict:
    """effopd's singular values against the exact ones (naive run)."""
    import torch
    from safetensors.torch import load_file

    eff = load_file(str(effopd_out / "tensors.safetensors"))
    exact = load_file(str(naive_sv))
    modules = json.loads((effopd_out / "analysis.json").read_text())["modules"]
    worst = {"top_r": (0.0, None), "top_r_randomized": (0.0, None), "all_q": (0.0, None)}
    methods: dict[str, int] = {}
    for key, s_hat in eff.items():
        if not key.startswith("singular_values/"):
            continue
        name = key.split("/", 1)[1]
        method = modules[name]["svd_method"]
        methods[method] = methods.get(method, 0) + 1
        s = exact[key][:, : s_hat.shape[1]].double()
        rel = (s_hat.double() - s).abs() / s.clamp_min(torch.finfo(torch.float64).tiny)
        for label, err in (("top_r", float(rel[:, :r].max())), ("all_q", float(rel.max()))):
            if err >= worst[label][0]:
                worst[label] = (err, name)
        if method == "randomized" and float(rel[:, :r].max()) >= worst["top_r_randomized"][0]:
            worst["top_r_randomized"] = (float(rel[:, :r].max()), name)
    return {
        "r": r,
        "modules": sum(methods.values()),
        "svd_methods": methods,
        "max_rel_err_top_r": worst["top_r"][0],
        "worst_module": worst["top_r"][1],
        "max_rel_err_top_r_randomized_only": worst["top_r_randomized"][0],
        "max_rel_err_all_q": worst["all_q"][0],
        "worst_module_all_q": worst["all_q"][1],
    }


def prepare_data(args, spec: dict) -> tuple[Path, float | None]:
    data = args.workdir / "data"
    spec_file = data / "spec.json"
    if spec_file.exists() and json.loads(spec_file.read_text()) == spec:
        print(f"reusing synthetic models in {data}", flush=True)
        return data, None
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    print(f"writing synthetic base + {len(spec['steps'])} checkpoint(s) to {data} ...", flush=True)
    res = spawn("generate", {"spec": spec, "data": str(data), "result": str(data / "generate.json")},
                data / "generate-job.json")
    write_json(spec_file, spec, indent=None)  # written last: its presence means the data is complete
    return data, res["wall_s"]


def summarize(runs: list[dict]) -> dict:
    keys = ("wall_s", "peak_rss_mb", "peak_anon_mb", "ru_maxrss_mb", "rss_after_imports_mb")
    return {k: median(r[k] for r in runs) for k in keys}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen0.5b")
    ap.add_argument("--checkpoints", type=int, default=2, help="checkpoints at steps 10..100 (2: early + final)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="default: runs/bench-analysis-speed/<shape>")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "analysis_speed.json")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="stored dtype of the models")
    ap.add_argument("--update-rank", type=int, default=16, help="rank k of the synthetic update direction D")
    ap.add_argument("--scale", type=float, default=0.05, help="‖D‖_F / ‖W_0‖_F")
    ap.add_argument("--noise", type=float, default=0.02, help="‖ε‖_F / ‖D‖_F")
    ap.add_argument("--embed-rows", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clean", action="store_true", help="delete the synthetic models at the end")
    args = ap.parse_args()
    if args.checkpoints < 1 or args.repeats < 1:
        ap.error("--checkpoints and --repeats must be at least 1")
    if args.checkpoints > 2 and args.shape == "qwen0.5b":
        ap.error("qwen0.5b keeps at most base + 2 checkpoints on disk (2 GB each in float32)")
    args.workdir = args.workdir or ROOT / "runs" / "bench-analysis-speed" / args.shape
    n = args.checkpoints
    steps = [T_FINAL] if n == 1 else [round(10 + (T_FINAL - 10) * i / (n - 1)) for i in range(n)]
    spec = {"generator": GENERATOR_VERSION, "shape": args.shape, "config": SHAPES[args.shape], "dtype": args.dtype,
            "steps": steps, "seed": args.seed, "update_rank": args.update_rank, "scale": args.scale,
            "noise": args.noise, "embed_rows": args.embed_rows}

    data, gen_s = prepare_data(args, spec)
    base = data / "base"
    ckpts = [(s, str(data / f"step-{s}")) for s in steps]
    bench = args.workdir / "measure"
    if bench.exists():
        shutil.rmtree(bench)
    bench.mkdir(parents=True)

    runs: dict[str, list[dict]] = {"effopd": [], "naive": []}
    for rep in range(args.repeats):
        order = ("naive", "effopd") if rep % 2 == 0 else ("effopd", "naive")
        for kind in order:
            out = bench / (f"effopd-{rep}" if kind == "effopd" else f"naive-{rep}.safetensors")
            job = {"base": str(base), "ckpts": ckpts, "out": str(out), "result": str(bench / f"{kind}-{rep}.json")}
            res = spawn(kind, job, bench / f"{kind}-{rep}-job.json")
            print(f"  repeat {rep + 1}/{args.repeats} {kind:6s}: {res['wall_s']:8.2f} s, peak RSS "
                  f"{res['peak_rss_mb']:8.0f} MiB, peak anon {res['peak_anon_mb']:8.0f} MiB", flush=True)
            runs[kind].append(res)

    eff_sel, naive_sel = runs["effopd"][0]["selected"], runs["naive"][0]["selected"]
    if sorted(eff_sel) != sorted(naive_sel):
        only_e, only_n = sorted(set(eff_sel) - set(naive_sel)), sorted(set(naive_sel) - set(eff_sel))
        raise SystemExit(f"effopd and naive decomposed different matrices: only effopd {only_e[:5]}, "
                         f"only naive {only_n[:5]}")
    acc = accuracy(bench / "effopd-0", bench / "naive-0.safetensors", runs["effopd"][0]["rank"])

    import torch

    med = {k: summarize(v) for k, v in runs.items()}
    speedup = med["naive"]["wall_s"] / med["effopd"]["wall_s"]
    mem_ratio = med["effopd"]["peak_rss_mb"] / med["naive"]["peak_rss_mb"]
    anon_ratio = med["effopd"]["peak_anon_mb"] / med["naive"]["peak_anon_mb"]
    targets = {
        "speedup_ge_5": speedup >= TARGETS["speedup_min"],
        "memory_le_quarter": mem_ratio <= TARGETS["memory_ratio_max"],
        "memory_anon_le_quarter": anon_ratio <= TARGETS["memory_ratio_max"],
        "rel_err_le_1e-3": acc["max_rel_err_top_r"] <= TARGETS["rel_err_max"],
    }
    entries_total = sum(math.prod(s) for s in _param_shapes(base))
    record = {
        "benchmark": "analysis_speed",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "shape": args.shape,
        "config": SHAPES[args.shape],
        "parameters": entries_total,
        "synthetic": spec,
        "matrices_decomposed": len(eff_sel),
        "checkpoint_steps": steps,
        "generation_s": gen_s,
        "machine": {"cpus": os.cpu_count(), "torch_threads": runs["effopd"][0]["torch_threads"],
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
                    "python": platform.python_version(), "platform": platform.platform(),
                    "mem_total_gib": _mem_total_gib()},
        "work": {
            "effopd": "analyze(base, ckpts, out, eval_fn=None, progress=False): streamed, analyses 1,4,6,8,9, "
                      "default SVD choice (exact if min(m,n)<=512, else randomized top-q)",
            "naive": "load_file(base) whole + load_file(each checkpoint) whole in turn; ||dW||_F of every tensor; "
                     "torch.linalg.svd(dW, full_matrices=False) of every attention/MLP matrix",
        },
        "repeats": args.repeats,
        "runs": runs,
        "median": med,
        "ratios": {"speedup_naive_over_effopd": speedup, "memory_effopd_over_naive": mem_ratio,
                   "memory_anon_effopd_over_naive": anon_ratio},
        "accuracy": acc,
        "targets": {**TARGETS, **targets},
        "pass": targets["speedup_ge_5"] and targets["memory_le_quarter"] and targets["rel_err_le_1e-3"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, record)
    print()
    print(markdown(record))
    print(f"\nwrote {args.out}")
    if args.clean:
        shutil.rmtree(data)


def _param_shapes(base: Path):
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), framework="pt") as f:
        return [tuple(f.get_slice(k).get_shape()) for k in f.keys()]


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            return round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        return None


def markdown(rec: dict) -> str:
    m, rt, acc, tg = rec["median"], rec["ratios"], rec["accuracy"], rec["targets"]
    ok = lambda b: "yes" if b else "**no**"  # noqa: E731
    lines = [
        f"Synthetic {rec['shape']} pair: {rec['parameters']:,} parameters, {rec['synthetic']['dtype']}, "
        f"checkpoints at steps {rec['checkpoint_steps']}, {rec['matrices_decomposed']} matrices decomposed per "
        f"checkpoint; {rec['machine']['cpus']} CPUs, {rec['machine']['torch_threads']} torch threads; "
        f"median of {rec['repeats']} fresh processes.",
        "",
        "| variant | wall time (s) | peak RSS (MiB) | peak anon (MiB) | RSS after imports (MiB) |",
        "|---|---:|---:|---:|---:|",
        *(f"| {label} | {m[k]['wall_s']:.2f} | {m[k]['peak_rss_mb']:.0f} | {m[k]['peak_anon_mb']:.0f} | "
          f"{m[k]['rss_after_imports_mb']:.0f} |"
          for k, label in (("naive", "naive (whole models, exact SVD)"), ("effopd", "`effopd analyze` (no eval)"))),
        f"| ratio | {rt['speedup_naive_over_effopd']:.2f}x faster | {rt['memory_effopd_over_naive']:.3f} | "
        f"{rt['memory_anon_effopd_over_naive']:.3f} | |",
        "",
        f"Top-{acc['r']} singular values vs exact: max relative error {acc['max_rel_err_top_r']:.2e} "
        f"({acc['worst_module']}); randomized-SVD modules only {acc['max_rel_err_top_r_randomized_only']:.2e}; "
        f"SVD methods {acc['svd_methods']}; all q kept values (info) {acc['max_rel_err_all_q']:.2e}.",
        "",
        "| target | value | met |",
        "|---|---:|:---:|",
        f"| speed-up ≥ {tg['speedup_min']:g}x | {rt['speedup_naive_over_effopd']:.2f}x | {ok(tg['speedup_ge_5'])} |",
        f"| peak RSS ≤ {tg['memory_ratio_max']:g} of naive | {rt['memory_effopd_over_naive']:.3f} | "
        f"{ok(tg['memory_le_quarter'])} |",
        f"| (peak anon ≤ {tg['memory_ratio_max']:g} of naive) | {rt['memory_anon_effopd_over_naive']:.3f} | "
        f"{ok(tg['memory_anon_le_quarter'])} |",
        f"| top-r rel. error ≤ {tg['rel_err_max']:g} | {acc['max_rel_err_top_r']:.2e} | "
        f"{ok(tg['rel_err_le_1e-3'])} |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
