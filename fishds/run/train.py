"""The `fishds train` run, start to finish: `run` reads as setup -> fix the mask -> loop -> outputs.

1. setup: preflight (fishds/run/preflight.py: every check that can fail without weights), process group,
   tokenizer and data, model + PEFT adapter, DeepSpeed engine (ZeRO 0-3, "auto" values filled from the config)
2. fix the mask: from a checkpoint, a mask file, or optional dense warm-up + the method core's selection flow
   (fishds/fish/selection.py: Fisher pass, exact distributed top-k, masks on every rank, report, mask file)
3. the loop: masked training (enforce.MaskEnforcer: gradient hooks + optimizer wrapper keep unselected entries
   fixed), periodic evaluation and checkpoints
4. outputs: evaluation, adapter, report (fishds/files.py names every file)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import dist as fdist
from .. import memory, quant, zero
from ..card import write_run_card
from ..config import Config, ConfigError
from ..files import CHECKPOINT_STATE, METRICS_FILE, REPORT_FILE, REPORT_PNG, SELECTION_REPORT, write_json
from ..fish import rules
from ..fish.adapter import gather_adapter
from ..fish.compact import CompactAdamW, check_resumed_state
from ..fish.compact import apply_mask as apply_compact_mask
from ..fish.enforce import MaskEnforcer, reset_unselected
from ..fish.mask import PackedMasks
from ..fish.pool import Pool
from ..fish.selection import (
    MaskFileError,
    load_mask_for_pool,
    progress_bar,
    publish_mask,
    rule,
    scoring_examples,
    select_masks,
)
from ..model import head_patterns, load_peft_model, load_tokenizer, peft_method
from . import best, schedule
from .checkpoint import checkpoint_root, load_checkpoint, save_checkpoint
from .data import Collator, ShardedBatches, data_counts_line, data_counts_report, load_examples
from .evaluate import evaluate
from .examples import subset
from .formats import pack
from .loss import loss_sum as token_loss_sum
from .loss import step_targets
from .mixing import mix
from .outputs import MetricsLog, save_adapter, write_run_config
from .preflight import Plan, preflight
from .reshard import data_position


@dataclass
class RunResult:
    engine: object
    pool: Pool
    masks: dict
    report: dict
    eval_metrics: dict = field(default_factory=dict)
    collate: object = None
    eval_examples: list = field(default_factory=list)
    test_examples: list = field(default_factory=list)


def start_fresh(plan: Plan) -> None:
    """Rank 0: move an earlier run's checkpoints aside (never deleted) so resume=auto cannot pick them up."""
    old = checkpoint_root(plan.output_dir)
    if plan.resume_from is None and fdist.is_main() and old.is_dir():
        os.replace(old, old.with_name(f"checkpoints.replaced-{time.strftime('%Y%m%d-%H%M%S')}"))


def _client_optimizer(cfg: Config, ds: dict):
    if "optimizer" in ds:
        return None  # DeepSpeed builds the one named in the JSON
    t = cfg.train
    if t.optimizer == "sgd":
        return lambda params: torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    adamw = CompactAdamW if cfg.fish.compact_optimizer else torch.optim.AdamW
    return lambda params: adamw(params, lr=t.lr, weight_decay=t.weight_decay)


def param_groups(cfg: Config, model) -> list:
    """The trainable parameters; with train.head_lr, the classification head (head_patterns, matched as the pool
    matches them) as a second group at that rate (the LR schedule scales every group's peak alike)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.train.head_lr is None:
        return trainable
    head = {id(t.param) for t in Pool.from_model(model, include=head_patterns(cfg)).tensors}
    return [
        {"params": [p for p in trainable if id(p) not in head]},
        {"params": [p for p in trainable if id(p) in head], "lr": cfg.train.head_lr},
    ]


def train_step(engine, batches: ShardedBatches, collate, grad_accum: int) -> dict:
    """One optimizer step over grad_accum micro-batches, the loss averaged over all the step's targets on all ranks
    (fishds/run/loss.py); returns this rank's share of that mean loss, token and target counts.
    One device synchronisation per step (the loss read at the end, besides the targets' all-reduce before the first
    micro-batch); tokens are counted on the host examples."""
    dev = fdist.device()
    losses, grad_norm = [], None
    lr = engine.get_lr()[0]
    raw = [batches.next() for _ in range(grad_accum)]
    tokens = sum(len(e["input_ids"]) for examples in raw for e in examples)
    micro_batches = [collate(examples) for examples in raw]
    targets = step_targets(micro_batches)
    for micro, host in enumerate(micro_batches):
        batch = {k: v.to(dev, non_blocking=True) for k, v in host.items()}
        loss = token_loss_sum(engine, batch) / targets
        engine.backward(loss * fdist.world_size(), scale_wrt_gas=False)
        if micro == grad_accum - 1 and engine.zero_optimization_stage() == 0:
            grad_norm = _dense_grad_norm(engine)  # stage 0 keeps no global norm; grads are reduced here
        engine.step()
        losses.append(loss.detach())
    if grad_norm is None:
        grad_norm = engine.get_global_grad_norm()
    grad_norm = None if grad_norm is None else float(grad_norm.item() if torch.is_tensor(grad_norm) else grad_norm)
    return {
        "loss": float(torch.stack(losses).float().sum()),
        "tokens": tokens,
        "targets": targets,
        "lr": lr,
        "grad_norm": grad_norm,
    }


def _dense_grad_norm(engine):
    """The gradient norm as a 0-dim tensor (no device synchronisation here; read once by the caller)."""
    norms = [p.grad.float().norm() for p in engine.module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


@dataclass
class Session:
    """A ready DeepSpeed engine with its pool, data and helpers (built by `setup`)."""

    cfg: Config
    plan: Plan
    engine: object
    pool: Pool  # the tensors the mask selects in
    trainable: Pool  # every trainable tensor (the pool plus fish.pool_exclude), what the adapter saves
    k: int
    budget: dict
    examples: list  # the training examples, unpacked (the Fisher pass draws from them; batches may pack them)
    eval_examples: list
    collate: Collator
    batches: ShardedBatches
    test_examples: list = field(default_factory=list)
    total_steps: int = 0  # optimizer steps of the run, fish.dense_steps included (fishds/run/schedule.py)


def setup(cfg: Config, ds_path: str | None = None) -> Session:
    """Preflight, process group, tokenizer and data, model + PEFT adapter, DeepSpeed engine."""
    plan = preflight(cfg, ds_path)
    fdist.init_distributed()
    start_fresh(plan)
    import deepspeed

    t = cfg.train
    dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
    tokenizer = load_tokenizer(plan.model_path, cfg.model.trust_remote_code)
    examples, eval_examples, test_examples = load_data(cfg, plan, tokenizer)
    train_blocks = pack(examples, cfg.data.max_length) if cfg.data.packing else examples  # Fisher: unpacked
    steps = schedule.total_steps(cfg, len(train_blocks), fdist.world_size())  # ConfigError before weights load
    ds = plan.ds  # resolved once, by preflight
    zero3_loading = None
    if (
        ds["zero_optimization"].get("stage", 0) == 3
        and not peft_method(cfg).needs_base_weights_at_init
        and not cfg.peft.modules_to_save
        and not plan.labels
    ):  # PEFT copies modules_to_save (heads) from weights
        # transformers loads the weights straight into ZeRO-3 partitions (zero.Init) while this object lives
        from transformers.integrations import HfDeepSpeedConfig

        zero3_loading = HfDeepSpeedConfig(ds)  # noqa: F841
    model = load_peft_model(cfg, plan.model_path, dtype, plan.labels, tokenizer.pad_token_id)
    if zero3_loading is not None:
        frozen = [p for p in model.parameters() if not p.requires_grad]
        fdist.print0(
            f"[fishds] ZeRO-3 loading: {sum(zero.is_partitioned(p) for p in frozen)}/{len(frozen)} frozen "
            "tensors partitioned as they loaded"
            + (
                " (transformers loads a 4-bit model whole on every rank; deepspeed.initialize partitions it)"
                if quant.enabled(cfg)
                else ""
            )
        )
    exclude = cfg.fish.pool_exclude + head_patterns(cfg)
    pool_before = Pool.from_model(model, cfg.fish.pool_include, exclude)
    budget = plan_budget(cfg, plan.baselines, pool_before, Pool.from_model(model).size)
    k = budget["k"]
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(cfg, model),
        optimizer=_client_optimizer(cfg, ds),
        lr_scheduler=None if "scheduler" in ds else schedule.scheduler(cfg, steps),
        config=ds,
    )
    batches = ShardedBatches(train_blocks, t.micro_batch_size, fdist.rank(), fdist.world_size(), t.seed)
    collate = Collator(tokenizer.pad_token_id, getattr(model.config, "_attn_implementation", None), dtype)
    return Session(
        cfg,
        plan,
        engine,
        Pool.from_model(engine.module, cfg.fish.pool_include, exclude),
        Pool.from_model(engine.module),
        k,
        budget,
        examples,
        eval_examples,
        collate,
        batches,
        test_examples,
        steps,
    )


def load_data(cfg: Config, plan: Plan, tokenizer) -> tuple[list, list, list]:
    """Training, evaluation and test examples (eval from data.eval_path, or data.eval_split of the training rows)."""
    d = cfg.data

    def load(path, key, limit, data=d):  # the rows preflight read and checked
        if not path:
            return []
        counts = plan.data_counts.setdefault(key, {})
        examples = load_examples(tokenizer, path, key, data, limit, plan.labels, rows=plan.rows.get(key), counts=counts)
        fdist.print0(data_counts_line(key, counts, data.max_length))
        return examples

    parts = [load(s.path, s.key, s.data.max_examples, s.data) for s in plan.sources]
    examples = mix(parts, [s.weight for s in plan.sources])
    if len(parts) > 1:
        fdist.print0(
            "[fishds] training mix: "
            + ", ".join(f"{round(s.weight * len(p))} of {s.key}" for s, p in zip(plan.sources, parts))
        )
    eval_examples = load(plan.eval_path, "data.eval_path", d.max_eval_examples)
    if d.eval_split:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
        n_eval = max(1, round(len(examples) * d.eval_split))
        if n_eval >= len(examples):
            raise ConfigError(f"data.eval_split={d.eval_split} leaves no training examples of {len(examples)}")
        held = set(order[:n_eval])
        eval_examples = [examples[i] for i in sorted(held)][: d.max_eval_examples]
        examples = subset(examples, [i for i in range(len(examples)) if i not in held])
    return examples, eval_examples, load(plan.test_path, "data.test_path", d.max_test_examples)


def plan_budget(cfg: Config, baselines: dict[int, int], pool: Pool, trainable: int) -> dict:
    """k, and the plain-PEFT baselines it compares with (../shared/FISH_TUNING.md section 1), counted by fishds."""
    f = cfg.fish
    always = trainable - pool.size  # tensors outside the pool train fully and count towards the budget
    out = {"protocol": f.budget, "pool": pool.size, "always_trained": always, "dense_same_rank": trainable}
    if rule(f.selection).dense:
        k = pool.size
    elif rules.rule_of(f).control == "head_only":  # classification control: only the head (outside the pool) trains
        out.update(k=0, trainable=always)
        return out
    elif f.budget == "match_rank":  # protocol 1: rank r masked down to the count of plain rank match_r
        k = baselines[f.match_r] - always
        out.update(baseline_r=f.match_r, baseline_trainable=baselines[f.match_r])
    else:
        k = pool.num_selected(f.keep_ratio, f.num_selected)
        for br, count in baselines.items():  # protocol 2: rank r at keep p vs plain rank r*p
            out.update(baseline_r=br, baseline_trainable=count)
    if not 1 <= k <= pool.size:
        raise ConfigError(f"the budget gives k={k}, outside 1..{pool.size} (pool) for fish.budget={f.budget}")
    out.update(k=k, trainable=k + always)
    return out


class StepLog:
    """Rank 0's record of every optimizer step: metrics.jsonl + TensorBoard, a progress bar or progress lines."""

    def __init__(self, s: Session):
        self.cfg, self.total_steps, self.batches = s.cfg, s.total_steps, s.batches
        resume_from = s.plan.resume_from
        write_run_config(s.plan.output_dir, s.cfg, s.plan.ds)
        self.metrics = MetricsLog(
            s.plan.output_dir / METRICS_FILE,
            append=resume_from is not None,
            report_to=s.cfg.train.report_to,
            config={"fishds": s.cfg.model_dump(mode="json"), "deepspeed": s.plan.ds},
        )
        self.bar = progress_bar(self.total_steps, "train")
        self.bar.update(first_step_after(resume_from) - 1)

    def __call__(self, step: int, phase: str, stats: dict, seconds: float) -> None:
        sums = torch.tensor([stats["tokens"], stats["loss"]], dtype=torch.float64)
        fdist.all_reduce_(sums)
        b = self.batches  # the loss is each rank's share of the step's token-weighted mean: summed, not averaged
        rec = {
            "step": step,
            "phase": phase,
            "loss": float(sums[1]),
            "lr": stats["lr"],
            "grad_norm": stats["grad_norm"],
            "tokens": int(sums[0]),
            "targets": stats["targets"],
            "epoch": schedule.epoch_of(
                b.position, len(b.examples), self.cfg.train.micro_batch_size, fdist.world_size()
            ),
            "seconds": seconds,
        }
        self.metrics.write(rec)
        tok_s = rec["tokens"] / max(seconds, 1e-9)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{tok_s:,.0f}")
        total = self.total_steps
        if (step % self.cfg.train.log_every == 0 or step == total) and self.bar.disable:
            fdist.print0(
                f"[fishds] {phase} step {step}/{total} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                f"{tok_s:,.0f} tok/s, {(total - step) * seconds:.0f}s left"
            )


def select_or_load(s: Session, log: StepLog) -> tuple[dict, dict]:
    """A mask file, or dense warm-up (optional) then the core's scoring and selection: the masks and the report."""
    cfg, engine, pool = s.cfg, s.engine, s.pool
    if cfg.fish.mask_path:
        try:
            masks = load_mask_for_pool(s.engine.module, s.trainable, cfg.fish.mask_path)
        except MaskFileError as e:
            raise ConfigError(str(e)) from None
        return masks, {
            "selection": f"file {cfg.fish.mask_path}",
            "pool_size": pool.size,
            "k": sum(int(m.sum()) for m in masks.values()),
        }
    initial = gather_adapter(pool) if cfg.fish.dense_steps else None
    for step in range(1, cfg.fish.dense_steps + 1):
        t0 = time.perf_counter()
        log(step, "dense", train_step(engine, s.batches, s.collate, cfg.train.grad_accum), time.perf_counter() - t0)
    masks, report = select_masks(
        cfg.fish,
        engine,
        pool,
        s.k,
        scoring_examples(cfg.fish, s.examples),
        s.collate,
        cfg.train.micro_batch_size,
        s.plan.output_dir,
        initial,
    )
    if initial is not None and cfg.fish.reset_unselected:
        reset_unselected(engine, pool, masks, initial)
    report["reset_unselected"] = bool(initial is not None and cfg.fish.reset_unselected)
    return masks, report


@dataclass
class FixedMask:
    masks: dict  # parameter name -> bool mask, every trainable tensor
    report: dict
    enforcer: MaskEnforcer | None
    first_step: int  # the first masked training step
    best_tracker: best.BestTracker  # save_best / metric_for_best / early stopping (state from a checkpoint)


def fix_mask(s: Session, log: StepLog) -> FixedMask:
    """The mask from a checkpoint, or fixed now (mask file, or warm-up + selection) and published; then enforced."""
    cfg, engine, out = s.cfg, s.engine, s.plan.output_dir
    resume_from = s.plan.resume_from
    if resume_from is not None:
        state, masks = load_checkpoint(engine, resume_from, s.trainable)
        check_resumed_state(engine, cfg.fish.compact_optimizer)
        first_step = state["step"] + 1
        s.batches.position = data_position(state, fdist.world_size(), cfg.train.micro_batch_size)
        log.metrics.truncate_after(state["step"])
        judge = best.BestTracker(cfg, state.get("best"))
        report = json.loads((out / SELECTION_REPORT).read_text())
        fdist.print0(f"[fishds] resumed from {resume_from} (step {state['step']})")
    else:
        masks, report = select_or_load(s, log)
        first_step = cfg.fish.dense_steps + 1
        judge = best.BestTracker(cfg)
        report.update(
            zero_stage=engine.zero_optimization_stage(),
            world_size=fdist.world_size(),
            dense_steps=cfg.fish.dense_steps,
            method=cfg.peft.method,
            budget=s.budget,
            precision=cfg.train.precision,
            **data_counts_report(s.plan.data_counts),
        )
        if s.plan.labels:
            report["labels"] = s.plan.labels  # class id -> label (num_labels for AutoModelForSequenceClassification)
        masks = publish_mask(engine.module, s.trainable, masks, report, out, cfg.save_initial_adapter)
    masks = PackedMasks.of(masks, fdist.device())  # 1 bit per entry, held once (the enforcer uses the same object)
    compact = cfg.fish.compact_optimizer
    enforcer = None if rule(cfg.fish.selection).dense else MaskEnforcer(engine, s.trainable, masks, restore=not compact)
    if compact:
        apply_compact_mask(engine, s.trainable, masks)
    fdist.print0(memory.line(memory.measure(engine, masks, enforcer), fdist.world_size()))
    log.metrics.mask_summary({k: v for k, v in report.items() if k != "per_tensor"})
    fdist.print0(
        f"[fishds] mask fixed: {report['selected']:,}/{s.trainable.size:,} trainable entries "
        f"(lora_A {report['share'].get('lora_A', 0):.1%}, lora_B {report['share'].get('lora_B', 0):.1%}); "
        f"Fisher pass {report.get('collect_seconds', 0):.1f}s, "
        f"selection {report.get('select_seconds', 0):.2f}s"
    )
    return FixedMask(masks, report, enforcer, first_step, judge)


def first_step_after(resume_from: Path | None) -> int:
    return json.loads((resume_from / CHECKPOINT_STATE).read_text())["step"] + 1 if resume_from else 1


def train_loop(s: Session, fixed: FixedMask, log: StepLog) -> int:
    """Masked training from fixed.first_step, with periodic evaluation and checkpoints (the best one kept);
    returns the last step trained (earlier than the total with early stopping)."""
    engine, batches, collate, t, judge = s.engine, s.batches, s.collate, s.cfg.train, fixed.best_tracker
    for step in range(fixed.first_step, log.total_steps + 1):
        t0 = time.perf_counter()
        log(step, "train", train_step(engine, batches, collate, t.grad_accum), time.perf_counter() - t0)
        if t.eval_every and step % t.eval_every == 0 and step != log.total_steps:
            step_eval = evaluate(engine, s.eval_examples, collate, t.micro_batch_size)
            log.metrics.write({"step": step, **step_eval})
            judge.update(step, step_eval)
        if t.save_every and step % t.save_every == 0 and step != log.total_steps:
            log.metrics.flush()
            judge.on_checkpoint(step)
            save_checkpoint(
                engine,
                s.plan.output_dir,
                step,
                batches.position,
                fixed.masks,
                t.keep_checkpoints,
                s.trainable,
                {"best": judge.state()},
                protect=judge.ckpt_step,
            )
        if judge.should_stop():
            fdist.print0(
                f"[fishds] early stopping at step {step}: {judge.name} did not improve for "
                f"{judge.bad_evals} evaluations (best {judge.value} at step {judge.step})"
            )
            return step
    return log.total_steps


def finish(s: Session, fixed: FixedMask, log: StepLog, last_step: int) -> RunResult:
    """Final evaluation, then on rank 0 the adapter, the report (written last: the run is finished) and its picture."""
    engine, collate, t, out = s.engine, s.collate, s.cfg.train, s.plan.output_dir
    masks, report, enforcer = fixed.masks, fixed.report, fixed.enforcer
    eval_metrics = evaluate(engine, s.eval_examples, collate, t.micro_batch_size)
    eval_metrics.update(evaluate(engine, s.test_examples, collate, t.micro_batch_size, prefix="test"))
    judge = fixed.best_tracker
    if not (judge.last and judge.last[0] == last_step):
        judge.update(last_step, eval_metrics)
    if eval_metrics:
        log.metrics.write({"step": last_step, **eval_metrics})
        for prefix, n in (("eval", len(s.eval_examples)), ("test", len(s.test_examples))):
            if f"{prefix}_loss" in eval_metrics:
                acc = eval_metrics.get(f"{prefix}_accuracy", eval_metrics.get(f"{prefix}_token_acc"))
                what = "accuracy" if f"{prefix}_accuracy" in eval_metrics else "response-token accuracy"
                fdist.print0(
                    f"[fishds] {prefix} loss {eval_metrics[f'{prefix}_loss']:.4f}, {what} {acc:.1%} on {n} examples"
                )
    log.metrics.close()
    adapter = gather_adapter(s.trainable)
    report["eval"] = eval_metrics
    use_ckpt = best.summarise(judge, report, last_step, log.total_steps) if t.save_best else False
    report["memory_per_rank"] = memory.gather(memory.measure(engine, masks, enforcer))  # after training: real state
    if fdist.is_main():
        save_adapter(engine.module, out, adapter)
        if use_ckpt:
            best.install_best_adapter(out, checkpoint_root(out) / f"step-{judge.ckpt_step:08d}")
        write_json(out / REPORT_FILE, report)
        write_run_card(out, s.cfg, report, s.plan.model_path)
        try:  # the run is finished; a failed plot must not fail it
            from ..report import write_report_png

            print(f"[fishds] mask report: {write_report_png(out)}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"[fishds] warning: {REPORT_PNG} not written ({e})", flush=True)
        print(f"[fishds] adapter written to {out.resolve()} (load with peft.PeftModel.from_pretrained)", flush=True)
    fdist.barrier()
    return RunResult(engine, s.pool, masks, report, eval_metrics, collate, s.eval_examples, s.test_examples)


def run(cfg: Config, ds_path: str | None = None) -> RunResult:
    """setup -> fix the mask -> masked training loop -> outputs."""
    s = setup(cfg, ds_path)
    log = StepLog(s)
    fdist.print0(
        f"[fishds] model {s.plan.model_path} | {cfg.peft.method} pool {s.pool.size:,} entries in "
        f"{len(s.pool.tensors)} tensors | selection {rules.label(cfg.fish)}, k={s.k:,} | "
        f"ZeRO-{s.engine.zero_optimization_stage()} | {fdist.world_size()} rank(s) | {cfg.train.precision}"
    )
    fixed = fix_mask(s, log)
    last_step = train_loop(s, fixed, log)
    return finish(s, fixed, log, last_step)
