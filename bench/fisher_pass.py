"""The Fisher pass three ways on the same N examples and engine: per-example loop, per-example batched, per-batch.

    python bench/fisher_pass.py --model smollm2 --zero-stage 3 --num-samples 16 --micro-batch-size 4
    python bench/fisher_pass.py --model /models/my-llama --zero-stage 2,3 --num-samples 64 --micro-batch-size 8 \\
        --out bench/results/fisher_pass.jsonl
    python bench/fisher_pass.py --ranks 1 ...      # one process (e.g. one GPU), no torchrun

Run without a launcher it starts itself on --ranks ranks (default 2) with torchrun (OMP_NUM_THREADS=1 per rank);
started by torchrun / deepspeed it runs as is. For each ZeRO stage: fishds' set-up (LoRA r=8 on q,k,v,o over
Rotten Tomatoes prompts, configs/demo.yaml, fp32, data.max_length --max-length), --warm-steps dense training
steps (so that LoRA's B is not zero and A's scores are not all zero), one untimed warm-up pass, then the three
timed passes:
- loop: fish.granularity=sample, fish.per_example=loop (one forward/backward per example, the paper's procedure);
- batched: fish.granularity=sample, fish.per_example=batched (one forward/backward per micro-batch, the same scores);
- batch: fish.granularity=batch (squares of micro-batch gradients: cheaper, a different quantity).
One JSON line per way: {"mode", "zero_stage", "num_samples", "micro_batch_size", "seconds", "max_rel_diff"
(max |scores - loop's| / max loop score, over all ranks; for batch a different quantity, shown for reference),
"weight_gathers_per_rank" (frozen parameters ZeRO-3 all-gathers during the pass, max over ranks; 0 below ZeRO-3),
"weight_gather_bytes_per_rank"}, then one line of ratios: batched/batch seconds (target <= 1.25), loop/batched
seconds, loop/batched gathers (the micro-batch size when every batched pass gathers each layer once).
Lines are printed by rank 0 and appended to --out (default bench/results/fisher_pass.jsonl).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (the cached SmolLM2-135M-Instruct) or a model folder")
    ap.add_argument("--zero-stage", default="3", help="3, 2, or a list: 2,3")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--warm-steps", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=2, help="ranks to start when run without a launcher")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/fisher_pass.jsonl"))
    ap.add_argument("--local_rank", type=int)
    ap.add_argument("overrides", nargs="*", help="extra fishds config overrides (key=value)")
    return ap.parse_args(argv)


def relaunch(args) -> int:
    """Start this script on args.ranks ranks with torchrun, OMP_NUM_THREADS=1 each."""
    from bench._session import torchrun

    cmd = torchrun(Path(__file__).resolve(), args.ranks, sys.argv[1:])
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false")
    return subprocess.run(cmd, env=env).returncode


class GatherCounter:
    """Counts the frozen parameters (and their bytes) ZeRO-3's coordinator all-gathers while active."""

    ATTR = "_PartitionedParameterCoordinator__all_gather_params"

    def __init__(self, engine):
        self.coord = (
            engine.optimizer.parameter_offload.get_param_coordinator()
            if engine.zero_optimization_stage() == 3
            else None
        )
        self.count = self.bytes = 0

    def __enter__(self):
        if self.coord is not None:
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

            orig = getattr(self.coord, self.ATTR)

            def counted(params, forward, _orig=orig):
                for p in params:
                    if not p.requires_grad and p.ds_status == ZeroParamStatus.NOT_AVAILABLE:
                        self.count += 1
                        self.bytes += p.ds_numel * p.element_size()
                return _orig(params, forward)

            setattr(self.coord, self.ATTR, counted)
        return self

    def __exit__(self, *exc):
        if self.coord is not None:
            delattr(self.coord, self.ATTR)


def run_stage(args, stage: int, record) -> None:
    import torch
    import torch.distributed as dist

    from fishds import dist as fdist
    from fishds.config import load_config
    from fishds.fish.fisher import collect_scores
    from fishds.fish.selection import scoring_examples
    from fishds.run.train import setup, train_step

    model = "smollm2-135m-instruct" if args.model == "smollm2" else args.model
    n, b = args.num_samples, args.micro_batch_size
    cfg = load_config(
        str(ROOT / "configs/demo.yaml"),
        [
            f"model.name_or_path={model}",
            f"fish.num_samples={n}",
            f"train.micro_batch_size={b}",
            f"data.max_length={args.max_length}",
            "data.max_examples=400",
            f"train.precision={args.precision}",
            "overwrite=true",
            "output_dir=" + tempfile.mkdtemp(prefix="fishds-fisher-pass-"),
        ]
        + list(args.overrides),
    )
    s = setup(cfg, str(ROOT / f"ds_configs/zero{stage}.json"))
    for _ in range(args.warm_steps):
        train_step(s.engine, s.batches, s.collate, 1)
    samples = scoring_examples(cfg.fish, s.examples)
    collect_scores(s.engine, s.pool, samples[: b * fdist.world_size()], "batch", b, s.collate)  # warm-up, untimed
    ways = {"loop": ("sample", "loop"), "batched": ("sample", "batched"), "batch": ("batch", "batched")}
    res, reference = {}, None
    for mode, (granularity, per_example) in ways.items():
        fdist.barrier()
        with GatherCounter(s.engine) as gathers:
            t0 = time.perf_counter()
            scores, stats = collect_scores(
                s.engine, s.pool, samples, granularity, b, s.collate, per_example=per_example
            )
            fdist.barrier()
            seconds = time.perf_counter() - t0
        if reference is None:
            reference = scores
        figs = torch.tensor(
            [
                float((scores - reference).abs().max()) if scores.numel() else 0.0,
                float(reference.abs().max()) if scores.numel() else 0.0,
                gathers.count,
                gathers.bytes,
            ],
            dtype=torch.float64,
        )
        fdist.all_reduce_(figs, op=dist.ReduceOp.MAX)
        res[mode] = {
            "mode": mode,
            "zero_stage": stage,
            "num_samples": n,
            "micro_batch_size": b,
            "seconds": round(seconds, 3),
            "max_rel_diff": float(figs[0] / figs[1]) if figs[1] else 0.0,
            "weight_gathers_per_rank": int(figs[2]),
            "weight_gather_bytes_per_rank": int(figs[3]),
            "passes_per_rank": stats["passes_per_rank"],
            "looped_tensors": stats["looped_tensors"],
            "world_size": fdist.world_size(),
            "precision": args.precision,
            "max_length": args.max_length,
            "pool": s.pool.size,
            "model": Path(s.plan.model_path).name,
        }
        record(res[mode])
    lp, bd, bt = res["loop"], res["batched"], res["batch"]
    record(
        {
            "ratio": "batched/batch",
            "zero_stage": stage,
            "num_samples": n,
            "micro_batch_size": b,
            "batched_over_batch_seconds": round(bd["seconds"] / bt["seconds"], 3),
            "loop_over_batched_seconds": round(lp["seconds"] / bd["seconds"], 3),
            "loop_over_batched_gathers": round(lp["weight_gathers_per_rank"] / bd["weight_gathers_per_rank"], 3)
            if bd["weight_gathers_per_rank"]
            else None,
            "batched_max_rel_diff": bd["max_rel_diff"],
            "target_seconds_ratio": 1.25,
            "target_max_rel_diff": 1e-5,
        }
    )
    del s


def main(argv=None) -> int:
    args = parse(argv)
    if "RANK" not in os.environ and args.ranks > 1:
        return relaunch(args)
    from fishds.dist import prefer_cpu_accelerator_if_no_cuda

    prefer_cpu_accelerator_if_no_cuda()
    from fishds import dist as fdist

    out = Path(args.out)

    def record(rec: dict) -> None:
        if fdist.is_main():
            print(json.dumps(rec), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("a") as f:
                f.write(json.dumps(rec) + "\n")

    for stage in [int(z) for z in str(args.zero_stage).split(",")]:
        run_stage(args, stage, record)
    fdist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
