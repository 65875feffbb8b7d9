"""The `effopd` command: demo | bootstrap | train | eval | analyze | report | export | serve-teacher."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from effopd.evaluate import make_eval_fn

EXAMPLES = """examples:
  effopd demo --quick                           # OPD vs OPD+EffOPD vs GRPO on the embedded task, one report
  effopd train --run-dir runs/opd optim.lr=3e-5 train.steps=200
  effopd train --preset grpo --run-dir runs/grpo extrapolate.enabled=true
  effopd train --config my.yaml --run-dir runs/x --resume
  effopd eval --model runs/opd/checkpoints/step-200 --data embedded
  effopd bootstrap --out build/default --export-jsonl build/data
  effopd analyze --base embedded --checkpoints runs/opd/checkpoints --out runs/opd/analysis
  effopd report runs/opd runs/grpo --out compare.html
  accelerate launch --config_file accelerate_configs/ddp.yaml -m effopd.cli train --run-dir runs/ddp
  effopd export runs/fsdp/checkpoints/step-100 --out runs/fsdp/step-100-hf   # a sharded checkpoint
  effopd serve-teacher --model embedded --port 8100 &      # then: effopd train model.teacher=http://127.0.0.1:8100
"""


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (a count of prompts, samples, tokens)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _add_generation_flags(p, what: str, models: str) -> None:
    """--max-new-tokens, --batch-size (defaults from the run of ``what``) and the device flags."""
    max_new, batch = _eval_defaults()
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="longest response in tokens; " + RUN_DEFAULT.format(key="eval.max_new_tokens", what=what, default=max_new))
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="prompts per generate call (memory vs speed); "
                   + RUN_DEFAULT.format(key="eval.batch_size", what=what, default=batch))
    _add_device_flags(p, models)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a student: OPD (default), G-OPD, GKD, GRPO, DAPO, SFT or continued SFT",
        description="Train a student by on-policy distillation (loss.method=opd) or a baseline through the same loop "
        "(gopd, gkd, grpo, dapo, sft, sft-gt); extrapolate.enabled=true adds EffOPD to any of them. Configuration: "
        "defaults, then --preset, then each --config YAML in order, then dotted KEY=VALUE overrides (e.g. optim.lr=1e-5). The "
        "resolved config is saved as RUN_DIR/config.yaml.",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    from effopd.config import list_presets

    p.add_argument("--preset", metavar="NAME", help=f"start from a shipped config: {', '.join(list_presets())} "
                   "(the embedded ones share one budget; qwen3-1.7b-opd is the published large-scale OPD setting)")
    p.add_argument("--config", action="append", default=[], metavar="YAML", help="config file (repeatable, after --preset)")
    p.add_argument("--run-dir", required=True, type=Path, help="output directory of the run")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in RUN_DIR")
    g.add_argument("--overwrite", action="store_true", help="delete RUN_DIR first if it holds a run")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


RUN_DEFAULT = "default: the run's {key} when {what} belongs to an effopd run, else {default}"


def _eval_defaults() -> tuple[int, int]:
    """The built-in max_new_tokens and batch size of evaluation (EvalConfig's), for the help texts."""
    from effopd.config import EvalConfig

    e = EvalConfig()
    return e.max_new_tokens, e.batch_size


def _add_device_flags(p, what: str) -> None:
    """--device and --dtype: where the evaluated models run and in which dtype they are loaded."""
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help=f"device to run {what} on: auto (default) = cuda when torch sees a CUDA device, else cpu")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help=f"dtype to load {what} in: auto (default) = bfloat16 on cuda, float32 on cpu")


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a model on a prompt set",
        description="Evaluate a model on a verifiable prompt set; prints avg@k, pass@k and mean length as JSON. "
        "When --model belongs to an effopd run (RUN_DIR/checkpoints/step-N, RUN_DIR/checkpoints or RUN_DIR itself, "
        "whose RUN_DIR holds config.yaml), the run's prompt template, eval.max_new_tokens, eval.batch_size and "
        "prompt set (data.eval, with its fields) are used unless a flag sets them; one line on stderr names "
        "what came from the run.")
    p.add_argument("--model", required=True,
                   help="a local model directory (any save_pretrained folder; an effopd run directory or its "
                   "checkpoints/ folder means its newest complete checkpoint), a Hugging Face hub id (looked up "
                   "in the local cache first), or `embedded`/`embedded-student`/`embedded-teacher`")
    p.add_argument("--data", default=None,
                   help="prompt set (.jsonl, .parquet, datasets dir) or `embedded` (the task's test split); "
                   + RUN_DEFAULT.format(key="data.eval", what="--model", default="embedded"))
    p.add_argument("--prompt-field", default=None,
                   help="field of the prompt; default: the run's data.prompt_field when --data is the run's own "
                   "prompt set, else `prompt`")
    p.add_argument("--answer-field", default=None,
                   help="field of the reference answer; default: the run's data.answer_field when --data is the "
                   "run's own prompt set, else `answer`")
    p.add_argument("--split", default=None,
                   help="split of a DatasetDict directory; default: the run's data.eval_split for its own prompt set")
    p.add_argument("--prompt-template", default=None, metavar="TEMPLATE",
                   help="text around every prompt: each {prompt} is replaced by the raw prompt, everything else "
                   "(braces too) is kept; " + RUN_DEFAULT.format(key="data.prompt_template", what="--model",
                                                                     default="{prompt} (the raw prompt)"))
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate at most N prompts (default: all)")
    p.add_argument("--samples", type=positive_int, default=1, help="responses per prompt (with --sample)")
    p.add_argument("--sample", action="store_true", help="sample at --temperature instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    _add_generation_flags(p, "--model", "the model")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", type=Path, default=None, help="write one JSON line per response here")


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="consolidate a sharded (FSDP2) checkpoint into Hugging Face weights",
        description="A checkpoint of a run trained with train.parallel=fsdp2 holds its weights and optimizer state "
        "in shards (sharded/, torch distributed checkpoint); only the last one also holds model.safetensors. "
        "export reads the shards of CHECKPOINT in one process (no GPU, no process group) and writes a "
        "from_pretrained-loadable model and tokenizer to --out, for effopd eval/analyze or any HF tool.",
    )
    p.add_argument("checkpoint", type=Path, help="a step-N folder of a sharded run (RUN_DIR/checkpoints/step-N)")
    p.add_argument("--out", type=Path, required=True, help="folder for model.safetensors, config and tokenizer")


def cmd_export(args) -> int:
    from effopd.sharding import export_sharded

    print(f"wrote {export_sharded(args.checkpoint, args.out)}")
    return 0


def _add_serve_teacher(sub) -> None:
    p = sub.add_parser(
        "serve-teacher", help="serve a frozen teacher over HTTP for trainers that should not hold it",
        description="Loads the teacher once and answers POST /logprobs (the per-token logprobs of given token ids) "
        "and GET /health (its vocabulary hash, which a trainer checks against the student's). Concurrent requests "
        "are scored in batches of up to --max-batch-tokens tokens. Point a run at it with "
        "model.teacher=http://HOST:PORT. Needs pip install 'effopd[serve]'.",
    )
    p.add_argument("--model", required=True, help="the teacher: a save_pretrained folder, a hub id, or embedded")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=positive_int, default=8000)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:N or cpu")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the teacher's dtype (default float32, as model.dtype; auto: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--max-batch-tokens", type=positive_int, default=65536,
                   help="tokens (rows x padded length) scored in one forward pass (default 65536)")


def cmd_serve_teacher(args) -> int:
    from effopd.serve import serve

    serve(args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
          max_batch_tokens=args.max_batch_tokens)
    return 0


def _add_bootstrap(sub) -> None:
    p = sub.add_parser(
        "bootstrap", help="rebuild the embedded tokenizer, teacher and student from a seed",
        description="Build the embedded default deterministically from a seed (about 15 minutes on 2 cores), "
        "and/or export the embedded task's splits as jsonl.",
    )
    p.add_argument("--out", type=Path, help="write tokenizer+teacher+student here (teacher/, student/, bootstrap.json)")
    p.add_argument("--export-jsonl", type=Path, metavar="DIR", help="write the task's train/val/test splits as DIR/{train,val,test}.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reduced", action="store_true", help="tiny budget (a minute), for tests")
    p.add_argument("--separate", action="store_true",
                   help="build the second testbed instead: a half-width student pre-trained from scratch apart from the "
                   "teacher on 1-2 operation problems (half worked, half bare), for the 3-operation task "
                   "(data.task_min_ops=3 data.task_max_ops=3); the teacher is --teacher, copied")
    p.add_argument("--teacher", default="embedded", metavar="DIR", help="with --separate: the teacher (default: the embedded one)")


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="OPD vs OPD + EffOPD vs GRPO on the embedded task, analysed, in one HTML report",
        description="On the embedded task (shipped student and teacher): evaluate both, train OPD, OPD + EffOPD and "
        "GRPO at the same budget (presets opd, opd-effopd, grpo: 100 steps of 64 samples, lr 1e-5), analyse every "
        "run's checkpoints, write RUN_DIR/report.html and print a comparison table. About 8.5 minutes on 2 CPU "
        "cores; --quick: about 2.5.",
    )
    p.add_argument("--run-dir", type=Path, default=None, help="default: runs/demo-<time>")
    p.add_argument("--quick", action="store_true", help="30 steps, smaller evaluation and validation sets")
    p.add_argument("--steps", type=int, default=None, help="training steps of every run (overrides the budget)")
    p.add_argument("--analysis-eval-limit", type=positive_int, default=None,
                   help="prompts per evaluation inside the analysis (default 200; 60 with --quick)")
    p.add_argument("--models", type=Path, default=None, metavar="DIR",
                   help="use DIR/{student,teacher} instead of the shipped models; bootstrapped into DIR if absent")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides for every run")


def _add_analyze(sub) -> None:
    p = sub.add_parser(
        "analyze", help="parameter-dynamics analyses of a sequence of checkpoints",
        description="Where the update went (modules, layers), how low-rank it is, how early its direction "
        "locks in, and what scaling an early checkpoint recovers. Reads any HF safetensors checkpoints "
        "one tensor at a time; writes OUT/analysis.json and OUT/tensors.safetensors. When the checkpoints belong "
        "to an effopd run (RUN_DIR, RUN_DIR/checkpoints or its step-N folders, RUN_DIR holding config.yaml), the "
        "evaluations use the run's prompt template, eval.max_new_tokens, eval.batch_size and prompt set "
        "(data.eval) unless a flag sets them, and --base defaults to the run's model.student; one line on stderr "
        "names what came from the run.",
    )
    p.add_argument("--base", default=None,
                   help="the initial model (θ_0): a local model directory, a Hugging Face hub id (looked up in the "
                   "local cache first; the analysis reads its safetensors files), or `embedded` (the shipped "
                   "student); default: the run's model.student when the checkpoints belong to an effopd run")
    p.add_argument("--checkpoints", required=True, nargs="+", metavar="CKPT",
                   help="a run directory, a run's checkpoints/ folder, step-N directories, a transformers/TRL "
                   "Trainer output_dir (its checkpoint-N folders), or STEP=PATH pairs")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--no-eval", action="store_true",
                   help="skip the analyses that evaluate models (efficiency, functional contribution, low-rank "
                   "reconstruction, weight scaling)")
    p.add_argument("--eval-data", default=None,
                   help="prompt set for those evaluations (.jsonl, .parquet, datasets dir, or `embedded`: the task's "
                   "test split); " + RUN_DEFAULT.format(key="data.eval", what="the checkpoints", default="embedded"))
    p.add_argument("--eval-limit", type=positive_int, default=500, help="evaluate on at most N prompts (greedy; default 500)")
    p.add_argument("--prompt-template", default=None, metavar="TEMPLATE",
                   help="text around every evaluation prompt: each {prompt} is replaced by the raw prompt; "
                   + RUN_DEFAULT.format(key="data.prompt_template", what="the checkpoints", default="{prompt}"))
    _add_generation_flags(p, "the checkpoints", "the evaluated models")
    p.add_argument("--rank", type=positive_int, default=8, help="r of the top-r subspaces compared over training")
    p.add_argument("--exact-svd", action="store_true", help="exact SVD for every matrix (default: exact only when small)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing analysis in OUT")


def _checkpoint_run(args: list[str]):
    """The checkpoint arguments with each run directory replaced by its checkpoints/ folder, and
    the distinct effopd run directories they belong to (empty when none does; several runs whose
    evaluation settings disagree are refused by :func:`_eval_settings`)."""
    from effopd.evaluate import CHECKPOINTS, find_run_dir

    out, runs = [], []
    for arg in args:
        label, sep, rest = arg.partition("=")
        path = rest if sep and "/" not in label else arg
        run = find_run_dir(path)
        if run is not None and Path(path) == run and (run / CHECKPOINTS).is_dir():
            arg = str(run / CHECKPOINTS) if path == arg else f"{label}={run / CHECKPOINTS}"
        out.append(arg)
        if run is not None and all(not _same_dir(run, r) for r in runs):
            runs.append(run)
    return out, runs


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a == b


def _eval_settings(runs: list, **flags):
    """The evaluation settings, flag > run config > default (:func:`effopd.evaluate.resolve_eval_settings`),
    and the run whose config supplied them (None without one)."""
    from effopd.evaluate import EvalSettingsError, read_run_settings, resolve_eval_settings

    settings = [(r, resolve_eval_settings(r, **flags)) for r in (read_run_settings(d) for d in runs)] or [
        (None, resolve_eval_settings(None, **flags))]
    (run, first), rest = settings[0], settings[1:]
    key = lambda e: (e.data, e.data_cfg, e.max_new_tokens, e.batch_size)  # noqa: E731
    for other_run, other in rest:
        if key(other) != key(first):
            raise EvalSettingsError(
                f"the checkpoints come from runs whose evaluation settings differ ({run.config}: "
                f"{'; '.join(first.from_run) or 'defaults'} vs {other_run.config}: {'; '.join(other.from_run) or 'defaults'}); "
                "pass --eval-data, --prompt-template, --max-new-tokens and --batch-size explicitly, or analyse one run")
    return run, first


def _say_from_run(command: str, config, taken: list[str]) -> None:
    """One line on stderr naming the values the run's config supplied (stdout stays the result)."""
    if config is not None and taken:
        print(f"effopd {command}: from {config}: {'; '.join(taken)} (a flag overrides each)", file=sys.stderr)


def cmd_analyze(args) -> int:
    from effopd.analysis import analyze
    from effopd.analysis.io import parse_checkpoint_args
    from effopd.evaluate import RUN_CONFIG, EvalSettingsError, read_run_settings
    from effopd.models import resolve

    ckpt_args, runs = _checkpoint_run(args.checkpoints)
    base, taken = args.base, []
    if base is None:
        students = {read_run_settings(r).student for r in runs}
        if len(students) != 1 or None in students:
            where = (f"the runs {', '.join(str(r) for r in runs)} name different students" if len(students) > 1
                     else "the checkpoints belong to no effopd run with a config.yaml naming model.student")
            raise EvalSettingsError(f"--base is not given and {where}; pass --base MODEL (the student the run started "
                                    "from: a model directory, a hub id or `embedded`)")
        base = students.pop()
        taken.append(f"base {base} (model.student)")
    base = resolve(base, "student")  # before the prompt set is read: a wrong --base fails at once
    eval_fn, config = None, runs[0] / RUN_CONFIG if runs else None
    if not args.no_eval:
        run, st = _eval_settings(runs, data=args.eval_data, prompt_template=args.prompt_template,
                                 max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.eval_limit)
        taken += st.from_run
        config = run.config if run else config
    _say_from_run("analyze", config, taken)
    if not args.no_eval:
        eval_fn = make_eval_fn(st.data, args.eval_limit, st.max_new_tokens, device=args.device, dtype=args.dtype,
                               prompt_template=st.prompt_template, batch_size=st.batch_size, data_cfg=st.data_cfg)
    record = analyze(base, parse_checkpoint_args(ckpt_args), args.out, rank=args.rank,
                     exact_svd=True if args.exact_svd else None, eval_fn=eval_fn, overwrite=args.overwrite)
    print(f"analysed {len(record['steps'])} checkpoints (steps {record['steps']}) -> {args.out}/analysis.json")
    return 0


def _add_report(sub) -> None:
    from effopd.report import add_arguments

    p = sub.add_parser(
        "report", help="one self-contained HTML report of one or more runs",
        description="Training curves, EffOPD search history and every parameter-dynamics analysis of the given "
        "runs (side by side when several), opening with a verdict per run: is the update concentrated, does "
        "its direction lock in early and low-rank, would extrapolation pay off. Reads only the files a run wrote.",
    )
    add_arguments(p)


def cmd_report(args) -> int:
    from effopd.report import run

    return run(args)


def _quiet_transformers() -> None:
    """No per-file load/save progress bars from transformers; effopd shows its own."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def cmd_train(args) -> int:
    from effopd.config import load_config, preset_path

    cfg = load_config(([preset_path(args.preset)] if args.preset else []) + args.config, args.overrides)
    _quiet_transformers()
    from effopd.train import train

    final = train(cfg, args.run_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        print(json.dumps(final, indent=1))
    if state.num_processes > 1:
        leave_process_group(state)
    return 0


def leave_process_group(state) -> None:
    """End a multi-process run: wait for every process, then exit at once (status 0).

    Not through the interpreter's teardown: freeing the last reference to a gloo process group
    (DDP's reducer holds one) joins gloo's worker threads while holding the GIL, and a worker
    still releasing a finished collective's tensors waits for the GIL, so now and then the
    process hangs at exit (or, without destroy_process_group, aborts with SIGABRT). Everything
    the run writes is on disk already; the streams are flushed here."""
    import logging

    state.wait_for_everyone()
    state.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _eval_target(model: str):
    """``(name, role, run_dir, checkpoint)`` for eval's --model: an effopd run directory or its
    checkpoints/ folder becomes its newest complete checkpoint (``checkpoint``, else None);
    ``run_dir`` is the run the model belongs to (None for any other model)."""
    from effopd.checkpoint import latest
    from effopd.evaluate import CHECKPOINTS, EvalSettingsError, find_run_dir

    if model in ("embedded", "embedded-student", "embedded-teacher"):
        return "embedded", model.partition("-")[2] or "student", None, None
    run_dir = find_run_dir(model)
    if run_dir is None or Path(model).parent.name == CHECKPOINTS:  # any model, or RUN_DIR/checkpoints/step-N
        return model, "student", run_dir, None
    folder = Path(model) if Path(model).name == CHECKPOINTS else run_dir / CHECKPOINTS
    newest = latest(folder)
    if newest is None:
        raise EvalSettingsError(f"--model {model} is an effopd run but {folder} holds no complete step-N checkpoint; "
                                "pass a model directory (e.g. RUN_DIR/checkpoints/step-N) as --model")
    print(f"effopd eval: evaluating the newest complete checkpoint {newest}", file=sys.stderr)
    return str(newest), "student", run_dir, str(newest)


def cmd_eval(args) -> int:
    from effopd.data import load_split
    from effopd.evaluate import evaluate_model
    from effopd.models import load_model, load_tokenizer, pick_device, pick_dtype, resolve

    name, role, run_dir, checkpoint = _eval_target(args.model)
    run, st = _eval_settings([run_dir] if run_dir is not None else [], data=args.data,
                             prompt_template=args.prompt_template, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size, prompt_field=args.prompt_field, answer_field=args.answer_field,
                             split=args.split, limit=args.limit)
    _say_from_run("eval", run.config if run else None, st.from_run)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    path = resolve(name, role)  # a wrong --model fails before the prompt set is read
    examples = load_split(st.data, st.data_cfg, "eval")
    tok, model = load_tokenizer(path, role), load_model(path, role, dtype, device)
    records: list = []
    metrics = evaluate_model(model, tok, examples, max_new_tokens=st.max_new_tokens, samples=args.samples,
                             greedy=not args.sample, temperature=args.temperature, seed=args.seed, records=records,
                             batch_size=st.batch_size, ks=tuple(k for k in (1, 2, 4, 8, 16, 32, 64) if k <= args.samples))
    if args.out:
        from effopd.utils import atomic_write_text

        atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in records))
    print(json.dumps({"model": args.model, **({"checkpoint": checkpoint} if checkpoint else {}), "data": st.data, "n": len(examples),
                      "device": str(device), "dtype": dtype, "max_new_tokens": st.max_new_tokens,
                      "prompt_template": st.prompt_template, **metrics}, indent=1))
    return 0


def cmd_bootstrap(args) -> int:
    if not args.out and not args.export_jsonl:
        print("effopd bootstrap: give --out DIR (build models) and/or --export-jsonl DIR (export the task)", file=sys.stderr)
        return 2
    if args.export_jsonl:
        from effopd.data import embedded_splits
        from effopd.data.loaders import write_jsonl

        for split, examples in embedded_splits(seed=args.seed).items():
            write_jsonl(examples, args.export_jsonl / f"{split}.jsonl")
            print(f"wrote {len(examples)} problems to {args.export_jsonl / f'{split}.jsonl'}")
    if args.out:
        from effopd.bootstrap import BootstrapConfig, SeparateConfig, bootstrap, bootstrap_separate, summary

        if args.separate:
            from effopd.models import resolve

            cfg = SeparateConfig.reduced(args.seed) if args.reduced else SeparateConfig(seed=args.seed)
            print(summary(bootstrap_separate(args.out, cfg, resolve(args.teacher, "teacher"))))
            return 0
        cfg = BootstrapConfig.reduced(args.seed) if args.reduced else BootstrapConfig(seed=args.seed)
        print(summary(bootstrap(args.out, cfg)))
    return 0


def cmd_demo(args) -> int:
    from effopd.demo import run_demo

    if args.steps is not None and args.steps <= 0:
        print(f"effopd demo: error: --steps must be > 0, got {args.steps}", file=sys.stderr)
        return 2
    run_dir = args.run_dir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    run_demo(run_dir, quick=args.quick, steps=args.steps, analysis_eval_limit=args.analysis_eval_limit,
             models_dir=args.models, overrides=args.overrides, progress=not args.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="effopd", description="On-policy distillation with EffOPD extrapolation.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from effopd import __version__

    parser.add_argument("--version", action="version", version=f"effopd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,bootstrap,train,eval,analyze,report,export,serve-teacher}")
    _add_demo(sub)
    _add_bootstrap(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_analyze(sub)
    _add_report(sub)
    _add_export(sub)
    _add_serve_teacher(sub)
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may come after flags too (`train --no-progress optim.lr=3e-5`): argparse
    # gives a `nargs="*"` positional only the run of words before the first flag.
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)} (see effopd {args.command} --help)")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from effopd.errors import RunStopped, UserError

    if args.command != "train":  # train first checks its config, which needs no transformers
        _quiet_transformers()
    handlers = {"demo": cmd_demo, "bootstrap": cmd_bootstrap, "train": cmd_train, "eval": cmd_eval, "analyze": cmd_analyze, "report": cmd_report,
                "export": cmd_export, "serve-teacher": cmd_serve_teacher}
    try:
        return handlers[args.command](args)
    except RunStopped as err:  # a signal, or non-finite losses: the message says what was saved
        print(f"effopd {args.command}: {err.prefix}{err}", file=sys.stderr)
        return err.exit_code
    except UserError as err:
        print(f"effopd {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # a full disk, a read-only or missing folder: the path and the cause, in one line
        where = f"{err.filename}: " if err.filename else ""
        print(f"effopd {args.command}: error: {where}{err.strerror or err}. Free disk space or fix the path and its "
              "permissions; a training run continues from its last checkpoint with --resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"effopd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
