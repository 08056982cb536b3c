"""Test driver: a Hugging Face Trainer with fishds' FishCallback, as a user would write it.

    torchrun --nproc_per_node 2 tests/hf_case.py --model M --train T --out O [--ds_config ds.json] [--trl]

Tiny Llama + LoRA (r=4 on q,v, as tests/conftest.base_overrides), tokenized with fishds' alpaca loader and
collated with fishds' Collator so that the Fisher examples equal those of fishds' own trainer. AdamW with
weight decay 0.1. The adapter is written with trainer.save_model(out); the callback writes fish_mask.safetensors
and init_adapter_model.safetensors there, this script start_adapter.safetensors (the adapter before any step).
--trl: TRL's SFTTrainer instead, as docs/hf-trainer.md shows it: the model by name, a peft_config, prompt/completion
rows that TRL tokenizes itself (loss on the completion), TRL's own collator.
"""

import argparse
import faulthandler
import sys
from pathlib import Path

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments  # noqa: E402

from fishds.config import DataSection  # noqa: E402
from fishds.fish.adapter import adapter_keys  # noqa: E402
from fishds.integrations.hf import FishCallback, prepare_cpu_deepspeed  # noqa: E402
from fishds.model import load_tokenizer  # noqa: E402
from fishds.run.data import Collator, load_examples  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--train", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--ds_config")  # none: plain Trainer (DDP under torchrun)
ap.add_argument("--steps", type=int, default=4)
ap.add_argument("--trl", action="store_true", help="TRL's SFTTrainer (model name + peft_config) instead of Trainer")
ap.add_argument("--keep_ratio", type=float, default=0.25)
ap.add_argument("--num_samples", type=int, default=16)
ap.add_argument("--save_steps", type=int, default=0)
ap.add_argument("--selection", help="FishCallback(selection=...), default: the callback's")
ap.add_argument("--mask_path", help="FishCallback(mask_path=...)")
ap.add_argument("--warmup_steps", type=int, default=0, help="-1: unset (FishCallback's default rule)")
ap.add_argument(
    "--resume_from",
    type=int,
    help="afterwards: a fresh model, Trainer and FishCallback resume from "
    "checkpoint-N and write their adapter into out/resumed",
)
ap.add_argument(
    "--then_fishds",
    help="afterwards, in the same process group: fishds' own run (1 step, ZeRO-2) "
    "on the same model, data and seeds, into this folder",
)
args = ap.parse_args()
faulthandler.dump_traceback_later(300, exit=True)  # a hung collective fails the test


def training_args():
    accel = prepare_cpu_deepspeed() if args.ds_config else None  # CPU: gloo ranks for DeepSpeed
    if args.trl:
        from trl import SFTConfig

        # TRL defaults to bf16 (fp32 here, on CPU) and to gradient checkpointing, which it makes reentrant for PEFT
        # under ZeRO-3: the Fisher pass needs non-reentrant checkpointing, or none (docs/hf-trainer.md)
        extra = {"max_length": 64, "packing": False, "bf16": False, "gradient_checkpointing": False}
    arguments = SFTConfig if args.trl else TrainingArguments
    return arguments(
        **(extra if args.trl else {}),
        output_dir=args.out,
        per_device_train_batch_size=4,
        max_steps=args.steps,
        learning_rate=0.01,
        weight_decay=0.1,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        logging_steps=1,
        report_to="none",
        seed=0,
        disable_tqdm=True,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        deepspeed=args.ds_config,
        dataloader_num_workers=0,
        accelerator_config=accel,
        use_cpu=not args.ds_config and not torch.cuda.is_available(),
    )


WARMUP = None if args.warmup_steps < 0 else args.warmup_steps
rule = {"selection": args.selection} if args.selection else {}
fish = FishCallback(  # first: its arguments are checked before any weights load
    keep_ratio=args.keep_ratio,
    num_samples=args.num_samples,
    seed=0,
    warmup_steps=WARMUP,
    mask_path=args.mask_path,
    **rule,
)
targs = training_args()
tok = load_tokenizer(args.model)


def train_and_save(trainer, start: dict) -> None:
    """Train, write the adapter with trainer.save_model(out), and on rank 0 the adapter before any step."""
    trainer.train()
    trainer.save_model(args.out)
    if trainer.is_world_process_zero():
        save_file(
            {k: v.contiguous() for k, v in adapter_keys(trainer.model, start).items()},
            str(Path(args.out) / "start_adapter.safetensors"),
        )


if args.trl:
    import json

    from datasets import Dataset
    from trl import SFTTrainer

    rows = [json.loads(line) for line in Path(args.train).read_text().splitlines()]
    ds = Dataset.from_list(
        [{"prompt": f"{r['instruction']} {r['input']}", "completion": f" {r['output']}"} for r in rows]
    )
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    fish = FishCallback(
        keep_ratio=args.keep_ratio, num_samples=args.num_samples, seed=0, warmup_steps=args.warmup_steps
    )
    trainer = SFTTrainer(model=args.model, args=targs, train_dataset=ds, processing_class=tok, peft_config=lora)
    fish.attach(trainer)
    model = trainer.model
    import deepspeed

    lora_params = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for p in lora_params if hasattr(p, "ds_id")]):
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}  # before any step
    train_and_save(trainer, start)
    if trainer.is_world_process_zero():
        print(
            f"[hf_case] done: {type(trainer).__name__}, engine {type(trainer.model_wrapped).__name__}, "
            f"{fish.report['selected']} selected, losses "
            f"{[round(h['loss'], 4) for h in trainer.state.log_history if 'loss' in h]}",
            flush=True,
        )
    sys.exit(0)
examples = load_examples(tok, args.train, "data.path", DataSection(path=args.train, max_length=64), None)


def make_model():
    torch.manual_seed(0)  # the adapter initialisation of fishds' run with train.seed=0
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    base.config.use_cache = False
    return get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )


model = make_model()
start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}  # before any step
trainer = Trainer(model=model, args=targs, train_dataset=examples, data_collator=Collator(tok.pad_token_id))
fish.attach(trainer)
train_and_save(trainer, start)
if trainer.is_world_process_zero():
    engine = type(trainer.model_wrapped).__name__
    print(
        f"[hf_case] done: engine {engine}, {fish.report['selected']} selected, losses "
        f"{[round(h['loss'], 4) for h in trainer.state.log_history if 'loss' in h]}",
        flush=True,
    )

if args.resume_from:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a second Trainer in this process (a new job resuming)
    targs = training_args()
    trainer2 = Trainer(model=make_model(), args=targs, train_dataset=examples, data_collator=Collator(tok.pad_token_id))
    fish2 = FishCallback(
        keep_ratio=args.keep_ratio, num_samples=args.num_samples, seed=0, warmup_steps=WARMUP, trainer=trainer2
    )
    trainer2.train(resume_from_checkpoint=str(Path(args.out) / f"checkpoint-{args.resume_from}"))
    trainer2.save_model(str(Path(args.out) / "resumed"))
    if trainer2.is_world_process_zero():
        print(f"[hf_case] resumed: mask {fish2.report['selection']}", flush=True)

if args.then_fishds:  # fishds' own trainer, for the mask comparison (saves a second launch of the test)
    from fishds.config import load_config
    from fishds.run.train import run

    run(
        load_config(
            None,
            [
                f"model.name_or_path={args.model}",
                f"data.path={args.train}",
                "data.max_length=64",
                "peft.r=4",
                "peft.alpha=8",
                "peft.target_modules=[q_proj,v_proj]",
                f"fish.num_samples={args.num_samples}",
                f"fish.keep_ratio={args.keep_ratio}",
                "fish.seed=0",
                "train.seed=0",
                "train.max_steps=1",
                "train.micro_batch_size=4",
                f"output_dir={args.then_fishds}",
            ],
        ),
        str(Path(__file__).resolve().parents[1] / "ds_configs" / "zero2.json"),
    )
