"""fishds against the Hugging Face Trainer (+PEFT) on the same job: tokens/s and peak memory, side by side.

    python bench/vs_hf_trainer.py [--model smollm2-135m-instruct] [--ds-config ds_configs/zero3.json] \
        [--ranks 2] [--steps 10] [--micro-batch-size 4] [--max-length 128] [--out bench/results/vs_hf_trainer.jsonl]

Four runs, each its own torchrun launch (so peak RSS is per run): plain LoRA through the Trainer and through
`fishds train` (selection dense), FISH-LoRA through `fishds train` and through the Trainer with
fishds.integrations.hf.FishCallback (selection fisher). The same model, LoRA (r, alpha, q/k/v/o), data file
(fishds' alpaca
tokenisation and Collator in both), DeepSpeed JSON, micro-batch, AdamW (lr, weight decay), linear schedule,
gradient clipping, precision, seed and number of steps; the Trainer logs every step (fishds writes a metrics
record every step). Each run trains steps + 1 optimizer steps; the figures cover the last `steps` of them: from
the end of the first masked step to the end of the last one (start-up, model loading, the Fisher pass and the
first step are excluded). tokens = the non-padding tokens (attention_mask) of every training forward in that
window, summed over ranks, counted by the same forward pre-hook on the PEFT model in both trainers; cpu_s: the CPU
time the processes spent in that window, summed over ranks (tokens_per_cpu_s: the figure that holds on a machine
whose cores other jobs share, where wall time mostly measures waiting for a core). peak_rss_mb:
the max over ranks of the process's peak resident memory (getrusage) over the whole run; peak_rss_train_mb: the
same read at the end of the measured window; on CUDA also peak_gpu_mb (torch.cuda.max_memory_allocated).

Prints one JSON line per run, then the ratios (fishds/hf per selection; fisher/dense step time and memory per
trainer, step time = 1 / tokens per second), and appends them to --out with the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_OUT = ROOT / "bench" / "results" / "vs_hf_trainer.jsonl"
RUNS = (("hf", "dense"), ("fishds", "dense"), ("fishds", "fisher"), ("hf", "fisher"))


def arguments(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="a model folder, or smollm2-135m-instruct (fishds' cached asset)",
    )
    ap.add_argument("--data", default="rotten_tomatoes", help="alpaca jsonl, or rotten_tomatoes (fishds' asset)")
    ap.add_argument("--ds-config", default=str(ROOT / "ds_configs" / "zero3.json"))
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="measured steps (one more step runs first, unmeasured)")
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--max-examples", type=int, default=2000)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--keep-ratio", type=float, default=0.25)
    ap.add_argument("--num-samples", type=int, default=16, help="Fisher examples (not in the measured window)")
    ap.add_argument("--granularity", default="batch", choices=("sample", "batch"))
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--hf-logging-steps", type=int, default=1)
    ap.add_argument(
        "--runs",
        default=",".join(f"{t}:{s}" for t, s in RUNS),
        help="comma-separated trainer:selection, in launch order",
    )
    ap.add_argument("--repeats", type=int, default=1, help="launch the list this many times; medians are compared")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per launch")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="jsonl the lines are appended to ('-': none)")
    ap.add_argument(
        "--profile",
        help="folder: rank 0 of each run writes <trainer>-<selection>.prof (cProfile) "
        "and the top functions by cumulative time to <trainer>-<selection>.txt",
    )
    ap.add_argument("--note", default="", help="free text stored with the ratio lines (e.g. 'random weights')")
    ap.add_argument("--worker", choices=("hf", "fishds"), help=argparse.SUPPRESS)
    ap.add_argument("--selection", choices=("dense", "fisher"), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ---- inside a launched run -----------------------------------------------------------------------------------


class Meter:
    """Step-end timestamps and the non-padding tokens of every forward of the PEFT model, per rank."""

    def __init__(self):
        self.tokens: list = []  # one 0-dim tensor per forward (summed at the end: no sync per step)
        self.ends: list[tuple[float, float, int]] = []  # (perf_counter, process CPU time, forwards) at each step end
        self.rss_at_window_end = 0
        self.attached = False

    def attach(self, model) -> None:
        self.attached = True

        def count(_module, args, kwargs):
            mask = kwargs.get("attention_mask")
            if mask is not None and _module.training:
                self.tokens.append(mask.detach().sum())

        model.register_forward_pre_hook(count, with_kwargs=True)

    def step_end(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append((time.perf_counter(), time.process_time(), len(self.tokens)))
        self.rss_at_window_end = peak_rss_bytes()

    def summary(self) -> dict:
        """Seconds and tokens (this rank) from the end of step 1 to the end of the last step."""
        (t0, c0, i0), (t1, c1, i1) = self.ends[0], self.ends[-1]
        return {
            "seconds": t1 - t0,
            "cpu_seconds": c1 - c0,
            "tokens": int(sum(int(t) for t in self.tokens[i0:i1])),
            "measured_steps": len(self.ends) - 1,
        }


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def load_model_path(name: str) -> str:
    if name == "smollm2-135m-instruct":
        from fishds.assets import smollm2_135m_instruct

        return str(smollm2_135m_instruct())
    return name


def data_path(name: str) -> str:
    if name == "rotten_tomatoes":
        from fishds.assets import rotten_tomatoes

        return str(rotten_tomatoes("alpaca")["train"])
    return name


def run_fishds(args, meter: Meter) -> None:
    """`fishds train` (fishds.cli.main) with fishds.run.train.train_step observed by the meter."""
    from fishds import cli
    from fishds.run import train as ftrain

    inner = ftrain.train_step

    def observed(engine, *a, **kw):
        if not meter.attached:
            meter.attach(engine.module)
        out = inner(engine, *a, **kw)
        meter.step_end()
        return out

    ftrain.train_step = observed
    out = tempfile.mkdtemp(prefix="fishds-vs-hf-")
    overrides = [
        f"model.name_or_path={load_model_path(args.model)}",
        f"data.path={data_path(args.data)}",
        "data.format=alpaca",
        f"data.max_length={args.max_length}",
        f"data.max_examples={args.max_examples}",
        "peft.method=lora",
        f"peft.r={args.lora_r}",
        f"peft.alpha={2 * args.lora_r}",
        "peft.dropout=0.0",
        f"peft.target_modules=[{args.targets}]",
        f"fish.selection={args.selection}",
        f"fish.keep_ratio={args.keep_ratio}",
        f"fish.num_samples={args.num_samples}",
        f"fish.granularity={args.granularity}",
        "fish.dense_steps=0",  # the mask from the first step: the measured window holds masked steps only
        "fish.seed=0",
        f"train.max_steps={args.steps + 1}",
        f"train.lr={args.lr}",
        f"train.weight_decay={args.weight_decay}",
        "train.scheduler=linear",
        f"train.micro_batch_size={args.micro_batch_size}",
        "train.grad_accum=1",
        "train.grad_clip=1.0",
        f"train.precision={args.precision}",
        "train.seed=0",
        f"train.log_every={args.steps + 1}",
        f"output_dir={out}",
        "overwrite=true",
    ]
    rc = cli.main(["train", "--ds_config", args.ds_config, *overrides])
    if rc:
        raise SystemExit(f"fishds train returned {rc}")


def run_hf(args, meter: Meter) -> None:
    """A Hugging Face Trainer on a PEFT model, as a user writes it; FishCallback for selection fisher."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from fishds.config import DataSection
    from fishds.integrations.hf import FishCallback, prepare_cpu_deepspeed
    from fishds.model import load_tokenizer
    from fishds.run.data import Collator, load_examples

    accel = prepare_cpu_deepspeed()  # CPU ranks: gloo; None (nothing done) where DeepSpeed has a GPU
    bf16 = args.precision == "bf16"
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf-vs-fishds-"),
        per_device_train_batch_size=args.micro_batch_size,
        max_steps=args.steps + 1,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        logging_steps=args.hf_logging_steps,
        report_to="none",
        seed=0,
        disable_tqdm=True,
        save_strategy="no",
        deepspeed=args.ds_config,
        dataloader_num_workers=0,
        accelerator_config=accel,
        bf16=bf16,
    )
    model_path = load_model_path(args.model)
    tok = load_tokenizer(model_path)
    path = data_path(args.data)
    examples = load_examples(
        tok, path, "data.path", DataSection(path=path, max_length=args.max_length), args.max_examples
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if bf16 else torch.float32)
    base.config.use_cache = False
    model = get_peft_model(
        base,
        LoraConfig(
            r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            lora_dropout=0.0,
            target_modules=args.targets.split(","),
            task_type="CAUSAL_LM",
        ),
    )
    meter.attach(model)

    class Timing(TrainerCallback):
        def on_step_end(self, *_a, **_kw):
            meter.step_end()

    trainer = Trainer(
        model=model, args=targs, train_dataset=examples, data_collator=Collator(tok.pad_token_id), callbacks=[Timing()]
    )
    if args.selection == "fisher":
        FishCallback(
            keep_ratio=args.keep_ratio,
            num_samples=args.num_samples,
            granularity=args.granularity,
            seed=0,
            warmup_steps=0,  # as fishds' run: the window holds masked steps only
        ).attach(trainer)
    trainer.train()


def worker(args) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from fishds.dist import prefer_cpu_accelerator_if_no_cuda

    prefer_cpu_accelerator_if_no_cuda()
    import torch
    import torch.distributed as dist

    meter = Meter()
    t_start = time.perf_counter()
    body = run_hf if args.worker == "hf" else run_fishds
    if args.profile and os.environ.get("RANK", "0") == "0":
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(body, args, meter)
        stem = Path(args.profile) / f"{args.worker}-{args.selection}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        prof.dump_stats(str(stem) + ".prof")
        with open(str(stem) + ".txt", "w") as f:
            pstats.Stats(prof, stream=f).sort_stats("cumulative").print_stats(60)
    else:
        body(args, meter)
    wall = time.perf_counter() - t_start
    s = meter.summary()
    cuda = torch.cuda.is_available()
    vals = torch.tensor(
        [
            s["tokens"],
            s["cpu_seconds"],
            s["seconds"],
            peak_rss_bytes(),
            meter.rss_at_window_end,
            torch.cuda.max_memory_allocated() if cuda else 0,
        ],
        dtype=torch.float64,
    )
    if dist.is_initialized() and dist.get_world_size() > 1:
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        summed = vals[:2].to(dev)
        dist.all_reduce(summed)  # tokens and CPU seconds: summed over ranks
        rest = vals[2:].to(dev)
        dist.all_reduce(rest, op=dist.ReduceOp.MAX)  # the slowest rank's seconds, the largest memory
        vals = torch.cat([summed, rest]).cpu()
    tokens, cpu_s, vals = vals[0].item(), vals[1].item(), vals[1:]
    world = dist.get_world_size() if dist.is_initialized() else 1
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
        mb = 1 << 20
        rec = {
            "trainer": args.worker,
            "selection": args.selection,
            "tokens_per_s": round(tokens / vals[1].item(), 2),
            "peak_rss_mb": round(vals[2].item() / mb, 1),
            "peak_rss_train_mb": round(vals[3].item() / mb, 1),
            "steps": s["measured_steps"],
            "tokens": int(tokens),
            "seconds": round(vals[1].item(), 6),
            "wall_s": round(wall, 1),
            "cpu_s": round(cpu_s, 3),
            "tokens_per_cpu_s": round(tokens / max(cpu_s, 1e-9), 2),
            "micro_batch_size": args.micro_batch_size,
            "max_length": args.max_length,
            "zero_stage": json.loads(Path(args.ds_config).read_text())["zero_optimization"].get("stage", 0),
            "ranks": world,
            "precision": args.precision,
            "device": "cuda" if cuda else "cpu",
            "model": Path(load_model_path(args.model)).name,
            "lora_r": args.lora_r,
            "targets": args.targets,
        }
        if cuda:
            rec["peak_gpu_mb"] = round(vals[4].item() / mb, 1)
        Path(args.result).write_text(json.dumps(rec))
    if dist.is_initialized():
        dist.barrier()


# ---- the driver ----------------------------------------------------------------------------------------------


def launch(args, trainer: str, selection: str, result: Path) -> dict:
    forward = [*sys.argv[1:], "--ds-config", args.ds_config, "--model", args.model, "--data", args.data]
    from bench._session import torchrun

    cmd = torchrun(
        Path(__file__).resolve(),
        args.ranks,
        [
            *forward,
            "--worker",
            trainer,
            "--selection",
            selection,
            "--result",
            str(result),
        ],
    )
    env = dict(
        os.environ,
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0 or not result.is_file():
        raise SystemExit(
            f"{trainer}/{selection} failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return json.loads(result.read_text())


def ratios(lines: list[dict]) -> list[dict]:
    """fishds/hf per selection and fisher/dense per trainer, on the medians over repeats."""

    def med(trainer, selection, field):
        vals = [r[field] for r in lines if r["trainer"] == trainer and r["selection"] == selection and field in r]
        return statistics.median(vals) if vals else None

    out = []
    mem_fields = ["peak_rss_mb", "peak_rss_train_mb"] + (
        ["peak_gpu_mb"] if any("peak_gpu_mb" in r for r in lines) else []
    )
    for selection in ("dense", "fisher"):
        hf, fd = med("hf", selection, "tokens_per_s"), med("fishds", selection, "tokens_per_s")
        if hf and fd:
            rec = {"ratio": "fishds/hf", "selection": selection, "tokens_per_s": round(fd / hf, 4)}
            hc, fc = med("hf", selection, "tokens_per_cpu_s"), med("fishds", selection, "tokens_per_cpu_s")
            if hc and fc:
                rec["tokens_per_cpu_s"] = round(fc / hc, 4)
            rec.update({f: round(med("fishds", selection, f) / med("hf", selection, f), 4) for f in mem_fields})
            rec["target"] = "tokens_per_s >= 1.0 and peak_rss_mb <= 1.0"
            rec["met"] = rec["tokens_per_s"] >= 1.0 and rec["peak_rss_mb"] <= 1.0
            out.append(rec)
    for trainer in ("hf", "fishds"):
        dense, fish = med(trainer, "dense", "tokens_per_s"), med(trainer, "fisher", "tokens_per_s")
        if dense and fish:
            rec = {"ratio": "fisher/dense", "trainer": trainer, "step_time": round(dense / fish, 4)}
            dc, fc = med(trainer, "dense", "tokens_per_cpu_s"), med(trainer, "fisher", "tokens_per_cpu_s")
            if dc and fc:
                rec["step_cpu_time"] = round(dc / fc, 4)
            rec.update({f: round(med(trainer, "fisher", f) / med(trainer, "dense", f), 4) for f in mem_fields})
            rec["target"] = "step_time <= 1.03 and peak_rss_mb <= 1.03"
            rec["met"] = rec["step_time"] <= 1.03 and rec["peak_rss_mb"] <= 1.03
            out.append(rec)
    return out


def driver(args) -> None:
    runs = [tuple(r.split(":")) for r in args.runs.split(",") if r]
    for trainer, selection in runs:
        if trainer not in ("hf", "fishds") or selection not in ("dense", "fisher"):
            raise SystemExit(
                f"--runs: {trainer}:{selection} is not trainer:selection with trainer hf|fishds and "
                "selection dense|fisher"
            )
    if not Path(args.ds_config).is_file():
        raise SystemExit(f"--ds-config {args.ds_config}: file not found")
    args.ds_config = str(Path(args.ds_config).resolve())
    args.model, args.data = (str(Path(p).resolve()) if Path(p).exists() else p for p in (args.model, args.data))
    command = "python bench/vs_hf_trainer.py " + " ".join(sys.argv[1:])
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for i, (trainer, selection) in enumerate(runs):
                rec = launch(args, trainer, selection, Path(tmp) / f"{rep}-{i}.json")
                rec["repeat"] = rep
                lines.append(rec)
                emit(args, rec)
    for rec in ratios(lines):
        rec.update(command=command, repeats=args.repeats, **({"note": args.note} if args.note else {}))
        emit(args, rec)


def emit(args, rec: dict) -> None:
    print(json.dumps(rec), flush=True)
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    a = arguments()
    if a.worker:
        worker(a)
    else:
        driver(a)
