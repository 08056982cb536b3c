"""QLoRA (NF4 backbone) + FISH on one device: step time FISH vs plain and peak memory against `fishds plan`.

    torchrun --nproc_per_node 1 bench/gpu/qlora_case.py --name NAME --config CFG --ds_config DS [--build] \
        [--rounds 2] [--block 3] [key=value ...]

One fishds session (fishds.run.train.setup: the config's model, LoRA, DeepSpeed engine) with quant.bits=4; then 2
warm-up steps, a Fisher pass (fish.granularity) and the exact top-k, and training steps alternating in blocks
between plain LoRA and FISH-LoRA (mask hooks + optimizer wrapper), as bench/step_time.py. --build: the model is
not read from disk; fishds' loader is replaced by one that builds the config's Llama in bf16 on the device, one
projection at a time quantized to NF4 by bitsandbytes (Linear4bit, storage = compute dtype, no double quant, as
fishds' own BitsAndBytesConfig), random weights: a 7B-shaped model without a download or 13 GB on disk.

Memory (CUDA): static = torch.cuda.memory_allocated after the first step (weights, adapter, optimizer state, masks);
peak = torch.cuda.max_memory_allocated over the Fisher pass and the steps; both next to fishds.plan.plan() of the
same config (plan.from_config: same shape, ZeRO stage, world, precision, r, targets, keep ratio, micro-batch,
data.max_length as the sequence length; with data.packing every sequence is max_length tokens). On CPU the
process's peak RSS instead. One JSON line, appended to $FISHDS_BENCH_RESULTS/qlora_case.jsonl (bench/_session).
"""

from __future__ import annotations

import argparse
import resource
import statistics
from pathlib import Path

from fishds.dist import prefer_cpu_accelerator_if_no_cuda  # noqa: E402

prefer_cpu_accelerator_if_no_cuda()

import torch  # noqa: E402

from bench._session import record, session  # noqa: E402
from bench.step_time import alternating_steps, timed_steps  # noqa: E402
from fishds import dist as fdist  # noqa: E402
from fishds.fish.fisher import collect_scores  # noqa: E402
from fishds.fish.mask import share_selection  # noqa: E402
from fishds.fish.select import exact_topk, float_keys  # noqa: E402
from fishds.fish.selection import scoring_examples  # noqa: E402


def build_random_nf4(cfg, model_path: str, dtype, labels=None, pad_token_id=None):
    """fishds.model.load_peft_model's contract, without weights on disk: the config's causal LM built in `dtype`
    on this rank's device (random init), every decoder projection replaced by an NF4 Linear4bit quantized from
    it one at a time (the full-precision projection is freed right after), then fishds' PEFT adapter."""
    import bitsandbytes as bnb
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from fishds import quant
    from fishds.model import peft_config

    dev = fdist.device()
    config = AutoConfig.from_pretrained(model_path)
    config.use_cache = False
    torch.manual_seed(cfg.train.seed)
    storage = quant.DTYPES[quant.storage_dtype(cfg)]
    compute = quant.DTYPES[quant.compute_dtype(cfg)]
    with torch.device(dev):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for parent in list(base.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=compute,
                    quant_type=cfg.quant.type,
                    quant_storage=storage,
                    compress_statistics=cfg.quant.double_quant,
                    device="meta",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data,
                    requires_grad=False,
                    quant_type=cfg.quant.type,
                    quant_storage=storage,
                    compress_statistics=cfg.quant.double_quant,
                    module=q,
                ).to(dev)  # quantizes here
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, q)
                del child
    quant.after_load(base)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return get_peft_model(base, peft_config(cfg.peft, cfg.data))


def weights_kind(model_path: str, built: bool) -> str:
    if built:
        return "random, built on the device (--build)"
    marker = Path(model_path) / ".fishds-complete"
    return "random (bench/gpu/prepare.py)" if marker.is_file() and "random" in marker.read_text() else "from disk"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--ds_config", default="ds_configs/zero2.json")
    ap.add_argument("--build", action="store_true", help="build random NF4 weights on the device (no files)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--block", type=int, default=3)
    ap.add_argument("--local_rank", type=int)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.build:
        import fishds.run.train

        fishds.run.train.load_peft_model = build_random_nf4
    cuda = torch.cuda.is_available()
    cfg, s = session(args, "fishds-qlora-", ["quant.bits=4"])
    timed_steps(s, 2)  # warm-up; the optimizer state exists from here on
    static = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    samples = scoring_examples(cfg.fish, s.examples)
    scores, stats = collect_scores(
        s.engine, s.pool, samples, cfg.fish.granularity, cfg.train.micro_batch_size, s.collate
    )
    local_sel, _ = exact_topk(float_keys(scores), s.k)
    masks = share_selection(s.pool, local_sel)
    plain, fish = alternating_steps(s, masks, args.rounds, args.block)
    from fishds.plan import from_config, plan

    arch, setup = from_config(cfg, args.ds_config, fdist.world_size())
    p = plan(arch, setup)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if fdist.is_main():
        mib = 2**20
        n4 = sum(p_.numel() for p_ in s.engine.module.parameters() if type(p_).__name__ == "Params4bit")
        rec = {
            "name": args.name,
            "device": "cuda" if cuda else "cpu",
            "model": Path(s.plan.model_path).name,
            "weights": weights_kind(s.plan.model_path, args.build),
            "layers": arch.layers,
            "hidden": arch.hidden,
            "zero_stage": setup.zero,
            "world_size": setup.world,
            "precision": setup.precision,
            "quant": "nf4",
            "lora_r": setup.r,
            "targets": setup.targets if isinstance(setup.targets, str) else ",".join(setup.targets),
            "keep_ratio": setup.keep_ratio,
            "micro_batch_size": setup.micro_batch,
            "seq_len": setup.seq_len,
            "packed_4bit_values": n4,
            "pool": s.pool.size,
            "k": s.k,
            "plain_step_s": round(statistics.median(plain), 4),
            "fish_step_s": round(statistics.median(fish), 4),
            "step_time_ratio": round(statistics.median(fish) / statistics.median(plain), 4),
            "fisher_pass_s": round(stats["collect_seconds"], 3),
            "fisher_granularity": cfg.fish.granularity,
            "fisher_samples": len(samples),
            "plan_model_states_mib": round(p["model_states"] / mib, 1),
            "plan_total_mib": round(p["total"] / mib, 1),
        }
        if cuda:
            rec.update(
                static_gpu_mib=round(static / mib, 1),
                peak_gpu_mib=round(peak / mib, 1),
                static_over_plan_states=round(static / p["model_states"], 3),
                peak_over_plan_total=round(peak / p["total"], 3),
            )
        else:
            rec.update(peak_rss_mib=round(peak / mib, 1))
        record("qlora_case", rec)
    fdist.barrier()


if __name__ == "__main__":
    main()
