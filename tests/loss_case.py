"""Test driver: the chunked cross-entropy against the full one on a DeepSpeed engine, 2 ranks (ZeRO-2 / ZeRO-3).

For data.packing off and on, each rank takes its own micro-batch and computes loss_sum and the local gradients of
every trainable tensor (torch.autograd.grad on the module: under ZeRO-3 the partitioned weights, lm_head included,
are gathered by their hooks in the forward, in each chunk and in each chunk's recompute) with train.loss_impl=full
and =chunked (chunks of 5 tokens, so examples are split across chunks). Then one engine.backward of the chunked
step loss (DeepSpeed's hooks, its reduction over ranks) and the reduced gradients (safe_get_full_grad) against
the full path's local gradients all-reduced by hand, then engine.step. Rank 0 writes loss_case.json into
output_dir: {packing: {"loss_rel_diff", "grad_rel_diff", "engine_grad_rel_diff", "grad_max"}} (max over ranks).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fishds.dist import prefer_cpu_accelerator_if_no_cuda  # noqa: E402

prefer_cpu_accelerator_if_no_cuda()

import argparse  # noqa: E402
import faulthandler  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402

from fishds import dist as fdist  # noqa: E402
from fishds import zero  # noqa: E402
from fishds.config import load_config  # noqa: E402
from fishds.run import loss as L  # noqa: E402
from fishds.run.formats import pack  # noqa: E402
from fishds.run.train import setup  # noqa: E402

faulthandler.dump_traceback_later(300, exit=True)  # a hung collective fails
ap = argparse.ArgumentParser()
ap.add_argument("--ds_config")
ap.add_argument("--local_rank", type=int)
ap.add_argument("overrides", nargs="*")
args = ap.parse_args()
cfg = load_config(None, args.overrides)
s = setup(cfg, args.ds_config)
engine, model = s.engine, s.engine.module
names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
zero3 = zero.zero3_coordinator(engine)
world, rank, dev = fdist.world_size(), fdist.rank(), fdist.device()


def rel(a: list, b: list) -> float:
    num = max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))
    return num / max(float(y.abs().max()) for y in b)


results = {}
mine = s.examples[rank * 8 : (rank + 1) * 8]
for packing in ("unpacked", "packed"):
    blocks = pack(mine, cfg.data.max_length)[:2] if packing == "packed" else mine[:4]
    batch = {k: v.to(dev) for k, v in s.collate(blocks).items()}
    targets = L.step_targets([batch])
    got = {}
    for impl in ("full", "chunked"):
        path = L.loss_path(model)
        path.impl, path.chunk_tokens = impl, 5
        loss = L.loss_sum(model, batch)
        grads = torch.autograd.grad(loss, params)
        zero.release_backward_leftovers(zero3)
        got[impl] = (loss.detach(), [g.detach().clone() for g in grads])
    zero.end_gradient_pass(engine, zero3)
    (lf, gf), (lc, gc) = got["full"], got["chunked"]
    # engine path with chunked: the step's mean loss x world (train_step's scaling), DeepSpeed reduces over ranks
    path.impl = "chunked"
    engine.backward(L.loss_sum(engine, batch) / targets * world, scale_wrt_gas=False)
    reduced = [safe_get_full_grad(p).detach().clone().reshape(g.shape) for p, g in zip(params, gf)]
    expected = []
    for g in gf:
        g = g.clone()
        fdist.all_reduce_(g)
        expected.append(g / targets)
    engine.step()
    figs = torch.tensor(
        [float((lc - lf).abs() / lf.abs()), rel(gc, gf), rel(reduced, expected), max(float(g.abs().max()) for g in gf)],
        dtype=torch.float64,
    )
    fdist.all_reduce_(figs, op=dist.ReduceOp.MAX)
    results[packing] = dict(zip(("loss_rel_diff", "grad_rel_diff", "engine_grad_rel_diff", "grad_max"), figs.tolist()))
    fdist.print0(f"[loss_case] {packing}: {results[packing]} ({len(names)} trainable tensors)")
if fdist.is_main():
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loss_case.json").write_text(json.dumps(results))
fdist.barrier()

from case_exit import exit_now  # noqa: E402

exit_now()
