"""`natjax train` and `natjax eval`.

  natjax train                                   # offline default: small NAT on sklearn digits
  natjax train --config nat_tiny_in1k --set optim.lr=5e-4 \
      --set data.batch_size=64 --workdir runs/nat_tiny
  natjax train --config finetune --init-from shi-labs/nat-mini-in1k-224 \
      --set data.dataset=folder:/data/pets --workdir runs/pets
  natjax eval --model runs/nat_tiny --dataset imagenet2012 --split validation

Multi-host: pass --coordinator-address HOST:PORT --num-processes N --process-id I on every host
(or set NATJAX_COORDINATOR_ADDRESS / NATJAX_NUM_PROCESSES / NATJAX_PROCESS_ID); each process then
loads its share of every global batch.
"""

from __future__ import annotations

import json
import os
import sys


def _add_distributed_flags(p) -> None:
    g = p.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--coordinator-address", default=os.environ.get("NATJAX_COORDINATOR_ADDRESS"))
    g.add_argument(
        "--num-processes",
        type=int,
        default=_env_int("NATJAX_NUM_PROCESSES"),
        help="total processes (default: $NATJAX_NUM_PROCESSES)",
    )
    g.add_argument(
        "--process-id",
        type=int,
        default=_env_int("NATJAX_PROCESS_ID"),
        help="this process (default: $NATJAX_PROCESS_ID)",
    )


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def init_distributed(args) -> None:
    """Calls jax.distributed.initialize when a coordinator is given (before any JAX use)."""
    if not args.coordinator_address:
        return
    if args.num_processes is None or args.process_id is None:
        raise ValueError("--coordinator-address needs --num-processes and --process-id.")
    import jax

    jax.distributed.initialize(
        coordinator_address=args.coordinator_address,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )


def register(sub) -> None:
    """Adds `train` and `eval` to the natjax CLI."""
    p = sub.add_parser("train", help="train NAT/DiNAT (no arguments: offline digits default)")
    p.add_argument(
        "--config",
        help="a shipped recipe by name (nat_tiny_in1k, finetune, digits, ...) or an experiment "
        "file defining get_config() (default: digits)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set optim.lr=5e-4 (repeatable)",
    )
    p.add_argument("--workdir", help="shortcut for --set run.workdir=DIR")
    p.add_argument("--init-from", help="converted checkpoint to start from (run.init_from)")
    p.add_argument("--max-steps", type=int, help="shortcut for --set run.max_steps=N")
    _add_distributed_flags(p)
    p.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="top-1/top-5 of a training run's newest checkpoint")
    e.add_argument("--model", required=True, help="training workdir")
    e.add_argument("--dataset", help="dataset (default: the run's)")
    e.add_argument("--split", help="split (default: the run's eval split)")
    e.add_argument("--data-dir", help="tfds data_dir")
    e.add_argument("--json", action="store_true", help="print the result as one JSON object")
    _add_distributed_flags(e)
    e.set_defaults(func=run_eval)


def run_train(args) -> int:
    from natjax.train import require_training_extra

    require_training_extra()
    from natjax.train import recipes
    from natjax.train.config import apply_overrides

    cfg = recipes.load(args.config)
    sets = list(args.set)
    if args.workdir:
        sets.append(f"run.workdir={args.workdir}")
    if args.init_from:
        sets.append(f"run.init_from={args.init_from}")
    if args.max_steps is not None:
        sets.append(f"run.max_steps={args.max_steps}")
    cfg = apply_overrides(cfg, sets)
    init_distributed(args)
    from natjax.train.interrupt import exit_status
    from natjax.train.loop import train

    summary = train(cfg)
    print(_summary_line(summary))
    return exit_status(summary["interrupted"]) if summary["interrupted"] else 0


def _summary_line(summary: dict) -> str:
    """The final line: where the run stopped, its final evaluation, where the outputs are."""
    ev = summary["eval"]
    scores = ""
    if ev:
        scores = f", eval top-1 {ev['top1']:.4f}"
        scores += f" top-5 {ev['top5']:.4f}" if "top5" in ev else ""
        scores += f" loss {ev['loss']:.4f} ({ev['count']} images)"
    stopped = " (interrupted)" if summary["interrupted"] else ""
    return f"natjax train: step {summary['step']}{stopped}{scores}; outputs in {summary['workdir']}"


def run_eval(args) -> int:
    from natjax.train import require_training_extra

    require_training_extra()
    init_distributed(args)
    from natjax.train.evaluate import evaluate_run, format_table

    out = evaluate_run(args.model, args.dataset, args.split, args.data_dir)
    if args.json:
        print(json.dumps(out))
    else:
        print(format_table(out, f"natjax eval: {args.model}"))
    return 0


def run_default(workdir: str = "runs/digits") -> int:
    """The offline default run (what `natjax demo` should call): small NAT on sklearn digits.

    Returns:
      0 on success (eval top-1 printed).
    """
    from natjax.train import require_training_extra

    require_training_extra()
    from natjax.train.defaults import digits_config
    from natjax.train.interrupt import exit_status
    from natjax.train.loop import train

    summary = train(digits_config(workdir))
    if summary["interrupted"]:
        print(_summary_line(summary))
        return exit_status(summary["interrupted"])
    print(
        f"natjax: digits default done: step {summary['step']}, validation top-1 "
        f"{summary['eval'].get('top1', float('nan')):.4f}; curves at {summary['plot']}",
        file=sys.stdout,
    )
    return 0
