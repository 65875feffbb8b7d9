"""The `effopd` command: demo | bootstrap | train | eval | analyze | report."""

from __future__ import annotations

import argparse
import json
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
"""


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


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a prompt set",
                       description="Evaluate a model on a verifiable prompt set; prints avg@k, pass@k and mean length.")
    p.add_argument("--model", required=True, help="model directory, hub id, or `embedded-student`/`embedded-teacher`")
    p.add_argument("--data", default="embedded", help="prompt set (.jsonl, .parquet, datasets dir) or `embedded` (test split)")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--answer-field", default="answer")
    p.add_argument("--split", default=None, help="split of a DatasetDict directory")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N prompts")
    p.add_argument("--samples", type=int, default=1, help="responses per prompt (with --sample)")
    p.add_argument("--sample", action="store_true", help="sample at --temperature instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", type=Path, default=None, help="write one JSON line per response here")


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
    p.add_argument("--analysis-eval-limit", type=int, default=None,
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
        "one tensor at a time; writes OUT/analysis.json and OUT/tensors.safetensors.",
    )
    p.add_argument("--base", required=True, help="the initial model (θ_0); `embedded` = the shipped student")
    p.add_argument("--checkpoints", required=True, nargs="+", metavar="CKPT",
                   help="a run's checkpoints/ folder, step-N directories, or STEP=PATH pairs")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--no-eval", action="store_true",
                   help="skip the analyses that evaluate models (efficiency, functional contribution, low-rank "
                   "reconstruction, weight scaling)")
    p.add_argument("--eval-data", default="embedded", help="prompt set for those evaluations (default: embedded test split)")
    p.add_argument("--eval-limit", type=int, default=500, help="evaluate on at most N prompts (greedy)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--rank", type=int, default=8, help="r of the top-r subspaces compared over training")
    p.add_argument("--exact-svd", action="store_true", help="exact SVD for every matrix (default: exact only when small)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing analysis in OUT")


def cmd_analyze(args) -> int:
    from effopd.analysis import analyze
    from effopd.analysis.io import parse_checkpoint_args
    from effopd.models import resolve

    eval_fn = None if args.no_eval else make_eval_fn(args.eval_data, args.eval_limit, args.max_new_tokens)
    record = analyze(resolve(args.base, "student"), parse_checkpoint_args(args.checkpoints), args.out, rank=args.rank,
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


def cmd_train(args) -> int:
    from effopd.config import load_config, preset_path
    from effopd.train import train

    cfg = load_config(([preset_path(args.preset)] if args.preset else []) + args.config, args.overrides)
    final = train(cfg, args.run_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    print(json.dumps(final, indent=1))
    return 0


def cmd_eval(args) -> int:
    from effopd.config import DataConfig
    from effopd.data import load_split
    from effopd.evaluate import evaluate_model
    from effopd.models import load_model, load_tokenizer

    name, role = args.model, "student"
    if name in ("embedded-student", "embedded-teacher"):
        name, role = "embedded", name.split("-")[1]
    data_cfg = DataConfig(prompt_field=args.prompt_field, answer_field=args.answer_field, eval_split=args.split, eval_limit=args.limit)
    examples = load_split(args.data, data_cfg, "eval")
    tok, model = load_tokenizer(name, role), load_model(name, role)
    records: list = []
    metrics = evaluate_model(model, tok, examples, max_new_tokens=args.max_new_tokens, samples=args.samples,
                             greedy=not args.sample, temperature=args.temperature, seed=args.seed, records=records,
                             ks=tuple(k for k in (1, 2, 4, 8, 16, 32, 64) if k <= args.samples))
    if args.out:
        from effopd.utils import atomic_write_text

        atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in records))
    print(json.dumps({"model": args.model, "data": args.data, "n": len(examples), **metrics}, indent=1))
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
        from effopd.bootstrap import BootstrapConfig, bootstrap, summary

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
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,bootstrap,train,eval,analyze,report}")
    _add_demo(sub)
    _add_bootstrap(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_analyze(sub)
    _add_report(sub)
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file load/save bars; effopd shows its own
    from effopd.errors import RunStopped, UserError

    handlers = {"demo": cmd_demo, "bootstrap": cmd_bootstrap, "train": cmd_train, "eval": cmd_eval, "analyze": cmd_analyze, "report": cmd_report}
    try:
        return handlers[args.command](args)
    except RunStopped as err:  # a signal, or non-finite losses: the message says what was saved
        print(f"effopd {args.command}: {err.prefix}{err}", file=sys.stderr)
        return err.exit_code
    except UserError as err:
        print(f"effopd {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"effopd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
