"""Test driver: many selection rules on one DeepSpeed engine, in one launch (1 or 2 ranks).

Phase A: the adapter is set to a fixed non-zero state (lora_B seeded; the same on every world size), then every
rule in PHASE_A selects through fishds.fish.selection.select_masks (scores saved with fish.save_scores).
Phase B: WARMUP dense
steps from that state, then the warm-up scores (adam_v, movement). Rank 0 writes into --out: state_a / initial /
final adapters (param names), <rule>/masks.safetensors, <rule>/<score>_scores.safetensors, <rule>/report.json.
"""

from pathlib import Path

from fishds.dist import prefer_cpu_accelerator_if_no_cuda  # noqa: E402

prefer_cpu_accelerator_if_no_cuda()

import argparse  # noqa: E402
import faulthandler  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from fishds import dist as fdist  # noqa: E402
from fishds.config import load_config  # noqa: E402
from fishds.fish.adapter import gather_adapter  # noqa: E402
from fishds.fish.enforce import reset_unselected  # noqa: E402
from fishds.fish.selection import scoring_examples, select_masks  # noqa: E402
from fishds.run.train import setup, train_step  # noqa: E402

WARMUP = 3
PHASE_A = {  # name -> fish overrides
    "fisher": {"fish.score": "fisher"},
    "lowest": {"fish.score": "lowest"},
    "fisher_tensor": {"fish.score": "fisher", "fish.allocation": "tensor"},
    "saliency_module": {"fish.score": "saliency", "fish.allocation": "module"},
    "snr_ab": {"fish.score": "snr", "fish.allocation": "ab_balanced"},
    "saliency_matched": {"fish.score": "saliency", "fish.allocation": "module", "fish.control": "random_matched"},
    "random_tensor": {"fish.score": "random", "fish.allocation": "tensor"},
    "random_ab": {"fish.score": "random", "fish.allocation": "ab_balanced"},
    "random_b_only": {"fish.score": "random", "fish.control": "random_b_only"},
}
PHASE_B = {
    "adam_v_tensor": {"fish.score": "adam_v", "fish.allocation": "tensor"},
    "movement_module": {"fish.score": "movement", "fish.allocation": "module"},
    "movement": {"fish.score": "movement"},
}

faulthandler.dump_traceback_later(300, exit=True)
ap = argparse.ArgumentParser()
ap.add_argument("--ds_config")
ap.add_argument("--local_rank", type=int)
ap.add_argument("--out", required=True)
ap.add_argument("overrides", nargs="*")
args = ap.parse_args()
out = Path(args.out)
cfg = load_config(None, args.overrides + [f"fish.dense_steps={WARMUP}"])
s = setup(cfg, args.ds_config)
engine, pool = s.engine, s.pool
examples = scoring_examples(cfg.fish, s.examples)

init = gather_adapter(pool)
g = torch.Generator().manual_seed(123)
state_a = {n: (torch.randn(v.shape, generator=g) * 0.05 if ".lora_B." in n else v) for n, v in init.items()}
reset_unselected(engine, pool, {n: torch.zeros(v.shape, dtype=torch.bool) for n, v in state_a.items()}, state_a)
assert all(torch.equal(gather_adapter(pool)[n], v) for n, v in state_a.items())


def run_rules(rules: dict, initial=None):
    for name, ov in rules.items():
        rcfg = load_config(
            None,
            args.overrides
            + [f"{k}={v}" for k, v in ov.items()]
            + [f"fish.dense_steps={WARMUP}", "fish.save_scores=true", f"output_dir={out / name}"],
        )
        (out / name).mkdir(parents=True, exist_ok=True)
        masks, report = select_masks(
            rcfg.fish, engine, pool, s.k, examples, s.collate, rcfg.train.micro_batch_size, out / name, initial
        )
        if fdist.is_main():
            save_file(
                {n: m.to(torch.uint8).contiguous() for n, m in masks.items()}, str(out / name / "masks.safetensors")
            )
            (out / name / "report.json").write_text(json.dumps(report))
        fdist.barrier()


run_rules(PHASE_A)
for _ in range(WARMUP):
    train_step(engine, s.batches, s.collate, cfg.train.grad_accum)
final = gather_adapter(pool)
run_rules(PHASE_B, initial=state_a)
if fdist.is_main():
    for name, adapter in (("state_a", state_a), ("final", final)):
        save_file({n: v.contiguous() for n, v in adapter.items()}, str(out / f"{name}.safetensors"))
    (out / "meta.json").write_text(json.dumps({"k": s.k, "world": fdist.world_size(), "warmup": WARMUP}))
fdist.barrier()

from case_exit import exit_now  # noqa: E402

exit_now()
