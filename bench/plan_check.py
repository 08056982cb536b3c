"""fishds plan next to published per-GPU memory figures (PEFT docs, DeepSpeed ZeRO-3 guide).

    python bench/plan_check.py

The published figures are whole-process GPU memory (nvidia-smi style: CUDA context, allocator cache,
communication buffers included); the plan counts tensors only (see fishds/plan.py for every formula).
"""

from fishds.plan import PRESETS, Setup, plan  # noqa: E402

GB, GIB = 1e9, 2**30
CASES = [  # (name, setup, published GB per GPU, source)
    (
        "Llama-2-70B QLoRA (NF4, double quant, bf16) + ZeRO-3, 2 GPUs, r=8 all-linear, micro-batch 2 x 2048, GC",
        Setup(zero=3, world=2, quant_bits=4, double_quant=True, precision="bf16", r=8, micro_batch=2, seq_len=2048),
        36.6,
        "PEFT docs, accelerate/deepspeed: QLoRA + ZeRO-3 on 2x40GB",
    ),
    (
        "Llama-2-70B LoRA (bf16) + ZeRO-3, 8 GPUs, r=8 all-linear, micro-batch 8 x 2048, GC",
        Setup(zero=3, world=8, precision="bf16", r=8, micro_batch=8, seq_len=2048),
        64.0,
        "PEFT docs, accelerate/deepspeed: LoRA + ZeRO-3 on 8x80GB",
    ),
]


def main():
    arch = PRESETS["llama-70b"]
    print(
        "| setup | plan: model states (GB) | plan: activations with GC (GB) | plan: total with GC (GB) | "
        "published (GB per GPU) | plan / published |"
    )
    print("|---|---|---|---|---|---|")
    for name, s, pub, src in CASES:
        r = plan(arch, s)
        print(
            f"| {name} | {r['model_states'] / GB:.1f} | {r['activations_gc'] / GB:.1f} | {r['total_gc'] / GB:.1f} | "
            f"{pub} ({src}) | {r['total_gc'] / GB / pub:.2f} |"
        )
    print()
    for name, s, _pub, _ in CASES:
        for keep in (None, 0.1):
            s.keep_ratio = keep
            r = plan(arch, s)
            tag = "plain LoRA" if keep is None else f"FISH keep {keep}"
            print(
                f"{name} [{tag}]: frozen {r['frozen'] / GB:.2f}, adapter {r['adapter'] / GB:.3f}, gradients "
                f"{r['gradients'] / GB:.3f}, optimizer {r['optimizer'] / GB:.3f}, masks {r['masks'] / GB:.3f}, "
                f"largest gathered {r['largest_gathered'] / GB:.2f}, activations {r['activations_gc'] / GB:.2f} "
                f"(no GC {r['activations'] / GB:.1f}), total {r['total_gc'] / GB:.2f} GB"
            )


if __name__ == "__main__":
    main()
