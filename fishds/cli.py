"""The `fishds` command (console script, pyproject `fishds = "fishds.cli:main"`).

    fishds train [--config X] [--ds_config Y] [section.key=value ...]   # the same run as launch/train.py
    fishds report OUTPUT_DIR                                           # OUTPUT_DIR/fish_mask_report.png
    fishds merge --base BASE --adapter ADAPTER_DIR --out OUT [--dtype float32|bfloat16|float16] [--overwrite]
    fishds plan MODEL --zero 3 --world 2 --quant 4 --r 8 --keep_ratio 0.1 ...  # memory per rank, no weights read
    fishds generate --adapter OUTPUT_DIR [--base BASE] [--prompt TEXT]          # a reply, or a chat on stdin
    fishds preprocess [--config X] [--ds_config Y] [--debug N] [section.key=value ...]  # tokenise into the cache
    fishds evaluate --adapter OUTPUT_DIR --data FILE                           # eval loss/ppl/accuracy of an adapter
    fishds compare --config X [--quick] [--seeds ...] [--lrs ...] [section.key=value ...]  # does FISH help here?
    fishds config-schema                                                       # JSON schema of the YAML config
    fishds --version

Multi-rank training: `torchrun --nproc_per_node 2 $(which fishds) train ...` or
`deepspeed --num_gpus 2 $(which fishds) train ...`. Bad input prints one line `fishds: error: ...` naming
the argument and returns 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _error(msg: str) -> int:
    print(f"fishds: error: {msg}", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="fishds", description="FISH-Tuning on DeepSpeed: train, report, merge")
    ap.add_argument("--version", action="version", version=f"fishds {__version__}")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed puts it first
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="run a FISH training job (same as launch/train.py)",
        epilog=_sections_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--config", help="fishds YAML config")
    t.add_argument("--ds_config", help="DeepSpeed JSON (ds_configs/zero{0,1,2,3}.json)")
    t.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    t.add_argument("overrides", nargs="*", help="section.key=value overrides")

    r = sub.add_parser("report", help="draw OUTPUT_DIR/fish_mask_report.png from a finished run")
    r.add_argument(
        "output_dir", metavar="OUTPUT_DIR", help="a fishds output_dir (fish_report.json, fish_mask.safetensors)"
    )

    m = sub.add_parser("merge", help="merge an adapter into its base model (a plain Hugging Face model folder)")
    m.add_argument("--base", required=True, help="base model folder, or a Hugging Face Hub id (org/name)")
    m.add_argument("--adapter", required=True, help="adapter folder (a fishds output_dir)")
    m.add_argument("--out", required=True, help="where to write the merged model (must not exist or be empty)")
    m.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), help="default: the base model's (config.json dtype)"
    )
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    from .plan import add_arguments

    add_arguments(sub.add_parser("plan", help="memory per rank from a model config alone (fishds/plan.py)"))

    g = sub.add_parser("generate", help="generate with a trained adapter (its tokenizer's chat template)")
    g.add_argument("--adapter", required=True, help="adapter folder (a fishds output_dir or checkpoint)")
    g.add_argument("--base", help="base model folder or Hub id (default: the adapter's base_model_name_or_path)")
    g.add_argument("--prompt", help="one user message; without it, a chat reads one turn per line on stdin")
    g.add_argument("--max_new_tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
    g.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), help="default: the base model's (config.json dtype)"
    )

    e = sub.add_parser(
        "evaluate",
        help="eval-only on a trained adapter: loss, perplexity, token accuracy (or accuracy for a classifier)",
        description="Scores --data with the adapter, formatted as its run formatted eval data (the run's "
        "fishds_config.yaml: base model, data format, chat template, max_length, precision, 4-bit loading). "
        "One process, on the GPU when one is present. Prints one line, then the metrics as JSON.",
    )
    e.add_argument("--adapter", required=True, help="a fishds output_dir, or one of its checkpoints/step-N folders")
    e.add_argument("--data", required=True, help="a data file (.jsonl/.json/.csv/.parquet), datasets folder or Hub id")
    e.add_argument(
        "--max_examples", type=int, help="score the first N rows (default: the run's data.max_eval_examples; 0 = all)"
    )

    from .compare import add_arguments as compare_arguments

    compare_arguments(
        sub.add_parser(
            "compare",
            help="does a FISH mask help on this task? rules vs a random mask vs plain PEFT, paired seeds "
            "(--quick: the default rule, one verdict line)",
            description="Runs `fishds train` once per arm, learning rate and paired seed; chooses each arm's rate "
            "on validation, reports test figures with paired differences and 95% t-intervals; --quick ends with "
            "one verdict line. Arms, budgets and files: docs/results.md#the-protocol-fishds-compare.",
        )
    )

    sub.add_parser(
        "config-schema",
        help="print the JSON schema of the fishds YAML config (for editors' completion)",
        description="Prints the JSON schema of the fishds config (pydantic's Config.model_json_schema()). "
        "Save it and point a YAML language server at it: '# yaml-language-server: $schema=./fishds.schema.json'.",
    )

    p = sub.add_parser("preprocess", help="check and tokenise every data split into the cache before a launch")
    p.add_argument("--config", help="fishds YAML config (the one the launch uses)")
    p.add_argument("--ds_config", help="DeepSpeed JSON (checked as the launch checks it)")
    p.add_argument("--debug", type=int, default=0, metavar="N", help="print N training examples, trained tokens marked")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return ap


def _sections_epilog() -> str:
    """`fishds train --help`: the config's sections and their keys, read from the schema itself."""
    import textwrap

    from pydantic import BaseModel

    from .config import Config

    lines = ["config sections (YAML, or section.key=value overrides):"]
    top = []
    for name, field in Config.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.append(f"  {name + ':':7} " + ", ".join(ann.model_fields))
        else:
            top.append(name)
    lines.append(f"  {'top:':7} " + ", ".join(top))
    lines.append("every key, its default and meaning: docs/configuration.md (or `fishds config-schema`)")
    return "\n".join(textwrap.fill(line, 118, subsequent_indent=" " * 10) for line in lines)


def _train(args) -> int:
    from .dist import prefer_cpu_accelerator_if_no_cuda

    prefer_cpu_accelerator_if_no_cuda()  # before anything imports deepspeed
    from . import dist as fdist
    from .config import ConfigError, load_config
    from .run.guard import RunStopped

    try:
        cfg = load_config(args.config, args.overrides)
        from .run.train import run

        run(cfg, args.ds_config)
    except ConfigError as e:
        return _error(str(e))
    except RunStopped:  # every rank agreed to stop (diverged, preempted, a failed write): the process leaves with
        fdist.close()  # the documented code; its process group goes first (see fishds/dist.close)
        raise
    return 0


def _report(args) -> int:
    from .report import write_report_png

    try:
        path = write_report_png(args.output_dir)
    except (FileNotFoundError, ValueError) as e:
        return _error(f"OUTPUT_DIR {args.output_dir}: {_strip(e, str(Path(args.output_dir)))}")
    print(path)
    return 0


def _merge(args) -> int:
    from .merge import MergeError, base_dtype, check_inputs, merge_adapter, resolve_base

    flags = {"base_model_path": "--base", "adapter_dir": "--adapter", "out_dir": "--out", "dtype": "--dtype"}
    try:
        base = resolve_base(args.base)  # a Hub id: its snapshot in the local HF cache (or downloaded)
        dtype = args.dtype or base_dtype(base)
        check_inputs(base, args.adapter, args.out, dtype, args.overwrite)  # fail before loading torch models
        out = merge_adapter(base, args.adapter, args.out, dtype=dtype, overwrite=args.overwrite)
    except MergeError as e:
        return _error(f"{flags.get(e.arg, e.arg)} {e.value}: {e.reason}")
    print(out)
    return 0


def _plan(args) -> int:
    from .config import ConfigError
    from .plan import from_args, plan, table

    try:
        arch, setup = from_args(args)
    except ConfigError as e:
        return _error(str(e))
    except (ValueError, KeyError) as e:
        return _error(f"MODEL {args.model}: {e}" if args.model and not str(e).startswith("--") else str(e))
    args.model = args.model or args.config
    print(
        f"{args.model}: ZeRO-{setup.zero}, {setup.world} rank(s), {setup.precision}, "
        f"{'4-bit' if setup.quant_bits else 'unquantized'} backbone, LoRA r={setup.r} on {setup.targets}, "
        f"keep {setup.keep_ratio if setup.keep_ratio is not None else 'all (plain LoRA)'}, "
        f"micro-batch {setup.micro_batch} x {setup.seq_len} tokens; per rank:"
    )
    print(table(plan(arch, setup)))
    return 0


def _generate(args) -> int:
    from .generate import main as generate
    from .merge import MergeError

    flags = {"base_model_path": "--base", "adapter_dir": "--adapter"}
    if args.max_new_tokens < 1 or args.temperature < 0:
        return _error("--max_new_tokens must be >= 1 and --temperature >= 0")
    try:
        return generate(args)
    except MergeError as e:
        return _error(f"{flags.get(e.arg, e.arg)} {e.value}: {e.reason}")


def _preprocess(args) -> int:
    from .dist import prefer_cpu_accelerator_if_no_cuda

    prefer_cpu_accelerator_if_no_cuda()  # before anything imports deepspeed
    from .config import ConfigError, load_config
    from .run.preprocess import preprocess

    if args.debug < 0:
        return _error("--debug must be >= 0")
    try:
        preprocess(load_config(args.config, args.overrides), args.ds_config, args.debug)
    except ConfigError as e:
        return _error(str(e))
    return 0


def _evaluate(args) -> int:
    import json

    from .dist import prefer_cpu_accelerator_if_no_cuda

    prefer_cpu_accelerator_if_no_cuda()  # before anything imports deepspeed
    from .config import ConfigError
    from .run.evaluate import evaluate_adapter

    if args.max_examples is not None and args.max_examples < 0:
        return _error("--max_examples must be >= 0 (0 = every row)")
    try:
        metrics, n = evaluate_adapter(args.adapter, args.data, args.max_examples)
    except ConfigError as e:
        return _error(str(e))
    if "eval_accuracy" in metrics:
        print(f"[fishds] {args.data}: loss {metrics['eval_loss']:.6f}, accuracy {metrics['eval_accuracy']:.2%} on {n}")
    else:
        print(
            f"[fishds] {args.data}: loss {metrics['eval_loss']:.6f}, perplexity {metrics['eval_ppl']:.4f}, "
            f"token accuracy {metrics['eval_token_acc']:.2%} on {n} examples ({metrics['eval_tokens']} target tokens)"
        )
    print(json.dumps(metrics), flush=True)
    return 0


def _compare(args) -> int:
    from .compare import run

    return run(args, prog="fishds compare", command=" ".join(["fishds", *args.argv]))


def _config_schema(args) -> int:
    import json

    from .config import Config

    print(json.dumps(Config.model_json_schema(), indent=1))
    return 0


def _strip(e: Exception, prefix: str) -> str:
    """The message without a leading 'PATH: ' (the CLI names the argument itself)."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return msg[len(prefix) + 2 :] if msg.startswith(f"{prefix}: ") else msg


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # usage errors (argparse printed them) and --help, as a return code
        return e.code if isinstance(e.code, int) else 2
    args.argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "train": _train,
        "report": _report,
        "merge": _merge,
        "plan": _plan,
        "generate": _generate,
        "evaluate": _evaluate,
        "compare": _compare,
        "config-schema": _config_schema,
        "preprocess": _preprocess,
    }
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
