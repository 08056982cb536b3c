"""Test driver: batched vs looped per-example Fisher scores on the same engine, for each method in --methods.

Run with torchrun (or as one process). For each method: fishds' set-up (model, adapter, DeepSpeed engine), two
dense training steps (so that LoRA's B is not zero and every score is informative), then collect_scores with
fish.per_example=loop and =batched on the same examples. Rank 0 writes per_example.json into output_dir:
{method: {"max_abs_diff", "max_score", "looped_tensors", "passes_loop", "passes_batched"}} (over all ranks).
"""

from pathlib import Path

from fishds.dist import prefer_cpu_accelerator_if_no_cuda  # noqa: E402

prefer_cpu_accelerator_if_no_cuda()

import argparse  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from fishds import dist as fdist  # noqa: E402
from fishds.config import load_config  # noqa: E402
from fishds.fish.fisher import collect_scores  # noqa: E402
from fishds.fish.selection import scoring_examples  # noqa: E402
from fishds.run.train import setup, train_step  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--ds_config")
ap.add_argument("--local_rank", type=int)
ap.add_argument("--methods", default="lora")
ap.add_argument("overrides", nargs="*")
import faulthandler

faulthandler.dump_traceback_later(300, exit=True)  # noqa: E702 - a hung collective fails
args = ap.parse_args()
results = {}
out_dir = None
for method in args.methods.split(","):
    cfg = load_config(None, args.overrides + [f"peft.method={method}"])
    out_dir = Path(cfg.output_dir)
    s = setup(cfg, args.ds_config)
    for _ in range(2):
        train_step(s.engine, s.batches, s.collate, 1)
    samples = scoring_examples(cfg.fish, s.examples)
    mbs = cfg.train.micro_batch_size
    loop, st_loop = collect_scores(s.engine, s.pool, samples, "sample", mbs, s.collate, per_example="loop")
    batched, st_b = collect_scores(s.engine, s.pool, samples, "sample", mbs, s.collate, per_example="batched")
    figs = torch.tensor(
        [
            float((loop - batched).abs().max()) if loop.numel() else 0.0,
            float(loop.abs().max()) if loop.numel() else 0.0,
        ],
        dtype=torch.float64,
    )
    fdist.all_reduce_(figs, op=dist.ReduceOp.MAX)
    results[method] = {
        "max_abs_diff": float(figs[0]),
        "max_score": float(figs[1]),
        "looped_tensors": st_b["looped_tensors"],
        "passes_loop": st_loop["passes_per_rank"],
        "passes_batched": st_b["passes_per_rank"],
    }
    del s
if fdist.is_main():
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "per_example.json").write_text(json.dumps(results))
fdist.barrier()

from case_exit import exit_now  # noqa: E402

exit_now()
