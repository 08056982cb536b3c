"""The `fishds train` run, start to finish: `run` reads as setup -> fix the mask -> loop -> outputs.

1. setup: preflight (fishds/run/preflight.py: every check that can fail without weights), process group,
   tokenizer and data, model + PEFT adapter, DeepSpeed engine (ZeRO 0-3, "auto" values filled from the config)
2. fix the mask: from a checkpoint, a mask file, or optional head-only steps (classification), optional dense
   warm-up + the method core's selection flow
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
from safetensors import SafetensorError

from .. import dist as fdist
from .. import memory, quant, zero
from ..card import write_run_card
from ..config import Config, ConfigError
from ..files import CHECKPOINT_STATE, METRICS_FILE, REPORT_FILE, REPORT_PNG, SELECTION_REPORT, write_json
from ..fish import rules
from ..fish.adapter import gather_adapter, mask_report, rank_sliced, save_mask_file
from ..fish.compact import CompactAdamW, check_resumed_state
from ..fish.enforce import MaskEnforcer
from ..fish.pool import Pool
from ..fish.regrow import Regrowth
from ..fish.selection import MaskFileError, budget, enforce_mask, progress_bar
from ..fish.selection import fix_mask as fix_core
from ..model import check_backends, head_patterns, is_classification, load_peft_model, load_tokenizer, peft_method
from . import best, guard, schedule
from .checkpoint import checkpoint_root, load_checkpoint, save_checkpoint
from .data import Collator, ShardedBatches, class_labels, data_counts_line, data_counts_report, load_examples
from .evaluate import evaluate
from .examples import subset
from .formats import pack
from .loss import configure as configure_loss
from .loss import loss_sum as token_loss_sum
from .loss import step_targets
from .mixing import mix
from .outputs import MetricsLog, save_adapter, write_run_config
from .preflight import Plan, baseline_counts, preflight
from .reshard import data_position


@dataclass(kw_only=True)
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
    head = {id(t.param) for t in Pool.from_model(model, include=head_patterns(cfg.data)).tensors}
    return [
        {"params": [p for p in trainable if id(p) not in head]},
        {"params": [p for p in trainable if id(p) in head], "lr": cfg.train.head_lr},
    ]


def train_step(engine, batches: ShardedBatches, collate, grad_accum: int) -> dict:
    """One optimizer step over grad_accum micro-batches, the loss averaged over all the step's targets on all ranks
    (fishds/run/loss.py); returns this rank's share of that mean loss, token and target counts.
    One device synchronisation per step (the step's losses, read before the optimizer step so that the run guard
    (fishds/run/guard.py) can skip a non-finite step on every rank; besides the targets' all-reduce before the first
    micro-batch and the guard's all-reduce of 3 numbers); tokens are counted on the host examples."""
    dev = fdist.device()
    g = guard.active()
    losses, grad_norm, bad = [], None, False
    lr = engine.get_lr()[0]
    raw = [batches.next() for _ in range(grad_accum)]
    tokens = sum(len(e["input_ids"]) for examples in raw for e in examples)
    micro_batches = [collate(examples) for examples in raw]
    targets = step_targets(micro_batches)
    skipped_before = getattr(engine, "skipped_steps", 0)
    if g is not None:
        g.step += 1
    for micro, host in enumerate(micro_batches):
        batch = {k: v.to(dev, non_blocking=True) for k, v in host.items()}
        loss = token_loss_sum(engine, batch) / targets
        if g is not None and f"{g.step}:{fdist.rank()}" in os.environ.get("FISHDS_FAULT_NAN_LOSS", "").split(","):
            loss = loss * float("nan")  # fault injection for the non-finite step tests
        engine.backward(loss * fdist.world_size(), scale_wrt_gas=False)
        losses.append(loss.detach())
        if micro == grad_accum - 1:
            if engine.zero_optimization_stage() == 0:
                grad_norm = _dense_grad_norm(engine)  # stage 0 keeps no global norm; grads are reduced here
            if g is not None:
                local = torch.stack(losses).float().sum()
                norm_ok = grad_norm is None or bool(torch.isfinite(grad_norm))
                bad, total_loss = g.agree(not (bool(torch.isfinite(local)) and norm_ok), float(local))
                g.skip = bad  # the optimizer wrapper makes no update on any rank
                g.fault_hooks()
        engine.step()
    if g is not None:
        g.skip = False
    else:
        total_loss = None
    if grad_norm is None:
        grad_norm = engine.get_global_grad_norm()
    grad_norm = None if grad_norm is None else float(grad_norm.item() if torch.is_tensor(grad_norm) else grad_norm)
    out = {
        "loss": float(torch.stack(losses).float().sum()),
        "tokens": tokens,
        "targets": targets,
        "lr": lr,
        "grad_norm": grad_norm,
    }
    if g is not None:
        ds_skipped = getattr(engine, "skipped_steps", 0) > skipped_before
        if g.after_step(bad, total_loss, grad_norm, lr, ds_skipped, engine.fp16_enabled()):
            out.update(skipped=True)
        if g.nonfinite_steps:
            out.update(nonfinite_steps=g.nonfinite_steps)
    return out


def _dense_grad_norm(engine):
    """The gradient norm as a 0-dim tensor (no device synchronisation here; read once by the caller)."""
    norms = [p.grad.float().norm() for p in engine.module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


@dataclass(kw_only=True)
class Session:
    """A ready DeepSpeed engine with its pool, data and helpers (built by `setup`)."""

    cfg: Config
    plan: Plan
    engine: object
    pool: Pool  # the tensors the mask selects in
    trainable: Pool  # every trainable tensor (the pool plus fish.pool_exclude), what the adapter saves
    frozen: Pool | None = None  # adapter tensors fish.freeze froze: never trained, saved with the adapter
    k: int
    budget: dict
    examples: list  # the training examples, unpacked (the Fisher pass draws from them; batches may pack them)
    eval_examples: list
    collate: Collator
    batches: ShardedBatches
    test_examples: list = field(default_factory=list)
    total_steps: int = 0  # optimizer steps of the run, fish.head_steps and dense_steps included (run/schedule.py)


def setup(cfg: Config, ds_path: str | None = None) -> Session:
    """Preflight, process group, tokenizer and data, model + PEFT adapter, DeepSpeed engine."""
    plan = preflight(cfg, ds_path)
    check_backends(cfg, plan.ds["zero_optimization"].get("stage", 0))
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
        and not peft_method(cfg.peft).needs_base_weights_at_init
        and not cfg.peft.modules_to_save
        and not plan.labels
    ):  # PEFT copies modules_to_save (heads) from weights
        # transformers loads the weights straight into ZeRO-3 partitions (zero.Init) while this object lives
        from transformers.integrations import HfDeepSpeedConfig

        zero3_loading = HfDeepSpeedConfig(ds)  # noqa: F841
    model = load_peft_model(cfg, plan.model_path, dtype, plan.labels, tokenizer.pad_token_id)
    frozen_names = Pool.freeze_matching(model, cfg.fish.freeze)
    if cfg.fish.freeze:
        fdist.print0(f"[fishds] fish.freeze: {len(frozen_names)} adapter tensors frozen at their initialisation")
        if not frozen_names:
            raise ConfigError(f"fish.freeze={cfg.fish.freeze} matches no trainable tensor of the adapter")
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
    exclude = cfg.fish.pool_exclude + head_patterns(cfg.data)
    pool_before = Pool.from_model(model, cfg.fish.pool_include, exclude)
    counts = budget(cfg.fish, pool_before, Pool.from_model(model).size, plan.baselines)  # k, computed once
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(cfg, model),
        optimizer=_client_optimizer(cfg, ds),
        lr_scheduler=None if "scheduler" in ds else schedule.scheduler(cfg, steps),
        config=ds,
    )
    if not is_classification(cfg.data):  # train.loss_impl, resolved on the model it computes the loss of
        configure_loss(engine.module, t.loss_impl, t.loss_chunk_tokens, engine.zero_optimization_stage())
    batches = ShardedBatches(train_blocks, t.micro_batch_size, fdist.rank(), fdist.world_size(), t.seed)
    collate = Collator(tokenizer.pad_token_id, getattr(model.config, "_attn_implementation", None), dtype)
    return Session(
        cfg=cfg,
        plan=plan,
        engine=engine,
        pool=Pool.from_model(engine.module, cfg.fish.pool_include, exclude),
        trainable=Pool.from_model(engine.module),
        frozen=Pool.named(engine.module, frozen_names),
        k=counts["k"],
        budget=counts,
        examples=examples,
        eval_examples=eval_examples,
        collate=collate,
        batches=batches,
        test_examples=test_examples,
        total_steps=steps,
    )


def load_data(cfg: Config, plan: Plan, tokenizer, files: dict | None = None) -> tuple[list, list, list]:
    """Training, evaluation and test examples (eval from data.eval_path, or data.eval_split of the training rows),
    each split checked and tokenised by the first rank into the token cache (or found there) and memory-mapped by
    every rank (fishds/run/data.py); classification reads the labels first and sizes the budget's baselines.
    `files` receives {key: (cache file, found there)}."""
    d = cfg.data
    if is_classification(cfg.data):
        plan.labels = class_labels(
            tokenizer,
            plan.sources,
            [
                ("data.eval_path", plan.eval_path, d.max_eval_examples),
                ("data.test_path", plan.test_path, d.max_test_examples),
            ],
        )
        plan.baselines = baseline_counts(cfg, plan.model_path, len(plan.labels))

    def load(path, key, limit, data=d):
        if not path:
            return []
        counts, where = plan.data_counts.setdefault(key, {}), {}
        examples = load_examples(tokenizer, path, key, data, limit, plan.labels, counts=counts, files=where)
        if where[key][1]:
            fdist.print0(f"[fishds.data] {key}: cache hit {where[key][0]}")
        if files is not None:
            files.update(where)
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
        eval_examples = subset(examples, sorted(held)[: d.max_eval_examples])
        examples = subset(examples, [i for i in range(len(examples)) if i not in held])
    return examples, eval_examples, load(plan.test_path, "data.test_path", d.max_test_examples)


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
        rec.update({k: stats[k] for k in ("skipped", "nonfinite_steps") if k in stats})  # fishds/run/guard.py
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


@dataclass(kw_only=True)
class FixedMask:
    masks: dict  # parameter name -> bool mask, every trainable tensor
    report: dict
    enforcer: MaskEnforcer | None
    first_step: int  # the first masked training step
    best_tracker: best.BestTracker  # save_best / metric_for_best / early stopping (state from a checkpoint)
    regrowth: Regrowth | None = None  # fish.regrow_every: the mask changes during training (fishds/fish/regrow.py)


def fix_mask(s: Session, log: StepLog) -> FixedMask:
    """The mask from a checkpoint, or fixed now by the method core's front door (fish.selection.fix_mask: a mask
    file, or the dense steps run here and the selection); then enforced."""
    cfg, engine, out = s.cfg, s.engine, s.plan.output_dir
    resume_from = s.plan.resume_from
    if resume_from is not None:
        state, masks = load_checkpoint(engine, resume_from, s.trainable, cfg.train.resume_trust_pickle)
        check_resumed_state(engine, cfg.fish.compact_optimizer)
        s.batches.position = data_position(state, fdist.world_size(), cfg.train.micro_batch_size)
        log.metrics.truncate_after(state["step"])
        fdist.print0(f"[fishds] resumed from {resume_from} (step {state['step']})")
        report = json.loads((out / SELECTION_REPORT).read_text())
        core = enforce_mask(cfg.fish, engine, s.trainable, masks, report, "mask fixed", masked=not cfg.fish.dense)
        first_step, judge = state["step"] + 1, best.BestTracker(cfg, state.get("best"))
    else:
        core = _fix_now(s, log)
        first_step, judge = cfg.fish.head_steps + cfg.fish.dense_steps + 1, best.BestTracker(cfg)
    regrowth = None
    if cfg.fish.regrow_every and core.enforcer is not None:
        first_masked = cfg.fish.head_steps + cfg.fish.dense_steps + 1
        regrowth = Regrowth(cfg.fish, engine, s.pool, s.trainable, core.enforcer, first_masked, s.total_steps)
        if resume_from is not None:
            regrowth.load(resume_from, state)
        fdist.print0(
            f"[fishds] regrowth every {regrowth.every} masked steps up to step {regrowth.last_step}: "
            f"{regrowth.nbytes / 2**20:.1f} MiB of gradient sums and values at growth on this rank"
        )
    fdist.print0(memory.line(memory.measure(engine, core.masks, core.enforcer), fdist.world_size()))
    log.metrics.mask_summary({k: v for k, v in core.report.items() if k != "per_tensor"})
    return FixedMask(
        masks=core.masks,
        report=core.report,
        enforcer=core.enforcer,
        first_step=first_step,
        best_tracker=judge,
        regrowth=regrowth,
    )


def _head_steps(s: Session, log: StepLog) -> None:
    """fish.head_steps: steps 1..head_steps train only the classification head (head_patterns). A MaskEnforcer with
    every head entry selected and every other trainable entry frozen keeps the pool and any other adapter tensor bit
    for bit (gradients zeroed, fp32 masters restored after each step: weight decay cannot move them); removed after."""
    cfg, engine = s.cfg, s.engine
    try:  # the head as the pool and train.head_lr match it
        head = {t.name for t in Pool.from_model(engine.module, include=head_patterns(cfg.data)).tensors}
    except ValueError:
        raise ConfigError(
            f"fish.head_steps={cfg.fish.head_steps}: the model has no trainable classification head"
        ) from None
    masks = {t.name: torch.full(t.shape, t.name in head, dtype=torch.bool) for t in s.trainable.tensors}
    enforcer = MaskEnforcer(engine, s.trainable, masks)
    try:
        for step in range(1, cfg.fish.head_steps + 1):
            t0 = time.perf_counter()
            log(step, "head", train_step(engine, s.batches, s.collate, cfg.train.grad_accum), time.perf_counter() - t0)
    finally:
        enforcer.remove()


def _fix_now(s: Session, log: StepLog):
    """The head steps (only the classification head trains), the dense steps (every pool entry trains), then the
    method core's front door."""
    cfg, engine = s.cfg, s.engine
    if cfg.fish.head_steps:
        _head_steps(s, log)
    initial = gather_adapter(s.pool) if cfg.fish.dense_steps and not cfg.fish.mask_path else None
    first = cfg.fish.head_steps + 1
    for step in range(first, first + (cfg.fish.dense_steps if initial is not None else 0)):
        t0 = time.perf_counter()
        log(step, "dense", train_step(engine, s.batches, s.collate, cfg.train.grad_accum), time.perf_counter() - t0)
    extra = dict(
        zero_stage=engine.zero_optimization_stage(),
        world_size=fdist.world_size(),
        head_steps=cfg.fish.head_steps,
        dense_steps=cfg.fish.dense_steps,
        method=cfg.peft.method,
        budget=s.budget,
        precision=cfg.train.precision,
        **data_counts_report(s.plan.data_counts),
    )
    if s.plan.labels:
        extra["labels"] = s.plan.labels  # class id -> label (num_labels for AutoModelForSequenceClassification)
    try:
        return fix_core(
            cfg.fish,
            engine=engine,
            pool=s.pool,
            trainable=s.trainable,
            k=s.k,
            examples=s.examples,
            collate=s.collate,
            micro_batch_size=cfg.train.micro_batch_size,
            out=s.plan.output_dir,
            initial=initial,
            mask_path=cfg.fish.mask_path,
            save_initial=cfg.save_initial_adapter,
            extra=extra,
        )
    except MaskFileError as e:
        raise ConfigError(str(e)) from None


def saved_adapter(s: Session) -> dict:
    """The adapter tensors to save (all ranks: a collective under ZeRO-3): the trainable ones and fish.freeze's."""
    return {**gather_adapter(s.trainable), **(gather_adapter(s.frozen) if s.frozen is not None else {})}


def cfg_rank_sliced(cfg: Config) -> bool:
    """Whether the final adapter is saved rank-sliced (fish.allocation=rank, a rule that ran)."""
    f = cfg.fish
    return not f.dense and not f.mask_path and f.allocation == "rank" and rules.CONTROLS[f.control].runs_rule


def first_step_after(resume_from: Path | None) -> int:
    return json.loads((resume_from / CHECKPOINT_STATE).read_text())["step"] + 1 if resume_from else 1


def _checkpoint(s: Session, fixed: FixedMask, log: StepLog, step: int, scheduled: bool = True) -> Path:
    """A complete checkpoint at `step` (all ranks); `scheduled`: a train.save_every one (the best tracker sees it)."""
    judge, regrowth = fixed.best_tracker, fixed.regrowth
    log.metrics.flush()
    if scheduled:
        judge.on_checkpoint(step)
    g = guard.active()
    extra = {"best": judge.state(), "nonfinite_steps": g.nonfinite_steps if g is not None else 0}
    if regrowth is not None:
        extra["regrowth"] = regrowth.history
    return save_checkpoint(
        s.engine,
        s.plan.output_dir,
        step,
        s.batches.position,
        fixed.masks,
        s.cfg.train.keep_checkpoints,
        s.trainable,
        extra,
        protect=judge.ckpt_step,
        frozen=s.frozen,
        rank_tensors=regrowth.rank_tensors() if regrowth is not None else None,
    )


def _preempted(s: Session, fixed: FixedMask, log: StepLog, step: int, saved: bool) -> guard.Preempted:
    """All ranks agreed to stop after `step`: the checkpoint at that step (unless it exists), then the exit."""
    resumed_at = first_step_after(s.plan.resume_from) - 1
    if not saved and not (s.plan.resume_from is not None and step == resumed_at):
        folder = _checkpoint(s, fixed, log, step, scheduled=False)
    else:
        folder = checkpoint_root(s.plan.output_dir) / f"step-{step:08d}"
    log.metrics.close()
    g = guard.active()
    sig = f" ({signal_name(g.signal)} on rank 0)" if g is not None and g.signal else ""
    return guard.Preempted(
        f"[fishds] preempted{sig}: stopped after step {step} of {log.total_steps}, checkpoint {folder}; run the same "
        f"command again to continue (resume=auto); exit code {guard.EXIT_PREEMPTED}"
    )


def signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


def train_loop(s: Session, fixed: FixedMask, log: StepLog) -> int:
    """Masked training from fixed.first_step, with periodic evaluation and checkpoints (the best one kept);
    returns the last step trained (earlier than the total with early stopping). A stop signal (fishds/run/guard.py)
    ends it after the current step with a checkpoint there (guard.Preempted); a signal during the head steps, the
    dense steps or the Fisher pass is acted on here, before the first masked step, with a checkpoint at the step the
    mask was fixed."""
    engine, batches, collate, t, judge = s.engine, s.batches, s.collate, s.cfg.train, fixed.best_tracker
    g = guard.active()
    if g is not None:
        g.step = fixed.first_step - 1
        if s.plan.resume_from is not None:
            state = json.loads((s.plan.resume_from / CHECKPOINT_STATE).read_text())
            g.nonfinite_steps = state.get("nonfinite_steps", 0)
        g.agree()
        if g.stop and fixed.first_step <= log.total_steps:
            raise _preempted(s, fixed, log, fixed.first_step - 1, saved=False)
    for step in range(fixed.first_step, log.total_steps + 1):
        t0 = time.perf_counter()
        log(step, "train", train_step(engine, batches, collate, t.grad_accum), time.perf_counter() - t0)
        if fixed.regrowth is not None and fixed.regrowth.due(step):  # before the step's evaluation and checkpoint
            fixed.masks, _ = fixed.regrowth.regrow(step)
        if t.eval_every and step % t.eval_every == 0 and step != log.total_steps:
            step_eval = evaluate(engine, s.eval_examples, collate, t.micro_batch_size)
            log.metrics.write({"step": step, **step_eval})
            judge.update(step, step_eval)
        saved = bool(t.save_every and step % t.save_every == 0 and step != log.total_steps)
        if saved:
            _checkpoint(s, fixed, log, step)
        if g is not None and g.stop and step != log.total_steps:
            raise _preempted(s, fixed, log, step, saved)
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
    adapter = saved_adapter(s)
    rank = None
    if cfg_rank_sliced(s.cfg):  # fish.allocation=rank: a plain LoRA of rank r_keep
        adapter, rank = rank_sliced(engine.module, adapter, masks)
        report["saved_rank"] = rank
    report["eval"] = eval_metrics
    use_ckpt = best.summarise(judge, report, last_step, log.total_steps) if t.save_best else False
    report["memory_per_rank"] = memory.gather(memory.measure(engine, masks, enforcer))  # after training: real state
    if fixed.regrowth is not None:  # the final mask: its statistics, the history of the events
        report.update(mask_report(s.trainable, masks))
        report["regrowth"] = fixed.regrowth.report()
    failure = None
    if fdist.is_main():
        try:  # a failed write (full disk) stops every rank, fish_report.json (the completion marker) unwritten
            guard.fault_file_size_limit(-1)  # FISHDS_FAULT_FSIZE=-1:0:BYTES: the final outputs' writes fail
            save_adapter(engine.module, out, adapter, r=rank)
            if fixed.regrowth is not None:
                save_mask_file(engine.module, out, masks)  # the final mask replaces the one fixed before training
            if use_ckpt:
                best.install_best_adapter(out, checkpoint_root(out) / f"step-{judge.ckpt_step:08d}")
            write_run_card(out, s.cfg, report, s.plan.model_path)  # README.md: the model card
            write_json(out / REPORT_FILE, report)
        except (OSError, RuntimeError, ValueError, SafetensorError) as e:
            failure = guard.write_error(e)
    guard.agree_writes(failure, f"the outputs in {out}")
    if fdist.is_main() and t.report_png:
        try:  # the run is finished; a failed plot must not fail it
            from ..report import write_report_png

            print(f"[fishds] mask report: {write_report_png(out)}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"[fishds] warning: {REPORT_PNG} not written ({e})", flush=True)
    if fdist.is_main():
        print(f"[fishds] adapter written to {out.resolve()} (load with peft.PeftModel.from_pretrained)", flush=True)
    fdist.barrier()
    return RunResult(
        engine=engine,
        pool=s.pool,
        masks=masks,
        report=report,
        eval_metrics=eval_metrics,
        collate=collate,
        eval_examples=s.eval_examples,
        test_examples=s.test_examples,
    )


def run(cfg: Config, ds_path: str | None = None) -> RunResult:
    """setup -> fix the mask -> masked training loop -> outputs. Stops early with guard.RunStopped (a SystemExit
    with the exit codes of fishds/run/guard.py): divergence, a stop signal, a failed write."""
    s = setup(cfg, ds_path)
    g = guard.Guard(cfg.train.max_nonfinite_steps).install(s.engine)
    if guard.restarts_share_the_store():
        fdist.print0(
            "[fishds] warning: torchrun --max-restarts with its shared rendezvous store: a restarted attempt can read "
            "the last attempt's addresses and hang in init_process_group; start torchrun with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment"
        )
    try:
        log = StepLog(s)
        fdist.print0(
            f"[fishds] model {s.plan.model_path} | {cfg.peft.method} pool {s.pool.size:,} entries in "
            f"{len(s.pool.tensors)} tensors | selection {rules.label(cfg.fish)}, k={s.k:,} | "
            f"ZeRO-{s.engine.zero_optimization_stage()} | {fdist.world_size()} rank(s) | {cfg.train.precision}"
        )
        g.fault_hooks()  # FISHDS_FAULT_SIGNAL=0:RANK: a signal before the mask is fixed (the Fisher pass)
        fixed = fix_mask(s, log)
        last_step = train_loop(s, fixed, log)
        return finish(s, fixed, log, last_step)
    finally:
        g.close()
