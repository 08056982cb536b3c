"""FISH-Tuning inside a Hugging Face Trainer (TRL trainers subclass it; untested), with or without DeepSpeed.

    trainer = Trainer(model=peft_model, args=TrainingArguments(..., deepspeed="ds_configs/zero3.json"),
                      train_dataset=ds, data_collator=collator)
    fish = FishCallback(keep_ratio=0.1, num_samples=64).attach(trainer)
    trainer.train()

At `on_train_begin` the Trainer has built its optimizer and, under DeepSpeed, the engine
(`trainer.model_wrapped`). The callback then runs the FISH method core (fishds/fish/) on that engine, the same
front door `fishds train` calls: fish.selection.fix_mask (a mask file, or the Fisher pass, ZeRO-3 aware, and the
exact distributed top-k; the published mask; enforce.MaskEnforcer: gradient hooks + wrapper of the inner torch
optimizer's step), with k from fish.selection.budget. Its arguments are validated as the `fish:` section of a
fishds config (fishds/fish/config.FishSection).
Without DeepSpeed (one process or DDP) the Trainer's torch optimizer is wrapped the same way, through
a small stand-in that answers what those functions ask of a DeepSpeed engine (ZeRO stage 0, fp32 weights).

Callbacks do not receive the Trainer, so the callback is given it: `FishCallback(...).attach(trainer)` registers it
with the trainer and remembers it (or pass `trainer=` to the constructor after building the Trainer without it).
Constructing a FishCallback selects DeepSpeed's CPU accelerator where no CUDA device exists (DS_ACCELERATOR=cpu,
unless set); importing this module changes nothing.
Files (rank 0): fish_mask.safetensors (fishds-packbits-v1, keyed like adapter_model.safetensors) and
init_adapter_model.safetensors (the adapter when the mask was fixed) in `output_dir` (default
args.output_dir) and fish_mask.safetensors in every checkpoint folder the Trainer writes. Resuming from such
a checkpoint reloads its mask instead of scoring again.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from pydantic import ValidationError
from transformers import TrainerCallback

from .. import dist as fdist
from .. import zero
from ..files import MASK_FILE
from ..fish.adapter import gather_adapter, save_mask_file
from ..fish.config import FishSection
from ..fish.enforce import MaskEnforcer
from ..fish.pool import Pool
from ..fish.selection import MaskFileError, budget
from ..fish.selection import fix_mask as fix_core
from ..schema import ConfigError


class FishError(RuntimeError):
    """A FishCallback set-up problem, with what to change."""


def prepare_cpu_deepspeed(timeout_minutes: float | None = None) -> dict | None:
    """Let a Trainer run DeepSpeed on CPU-only ranks (gloo); call before TrainingArguments and pass the result as
    TrainingArguments(accelerator_config=...). Returns None (and does nothing) where DeepSpeed has a GPU accelerator.

    accelerate only starts DeepSpeed's process group with a backend it detects from a GPU-like device, so on CPU the
    Trainer would see one rank per process. This starts accelerate's shared state with gloo and DeepSpeed itself
    (skipping the ~1 min compile of a shared-memory op that only inference uses), so that the Trainer's
    accelerator_config={"use_configured_state": True} picks it up. Without a launcher (plain `python script.py`) it
    sets up a world of one process. The collective timeout is fishds' (timeout_minutes,
    else $FISHDS_COLLECTIVE_TIMEOUT_S, else 30 min), not TrainingArguments.ddp_timeout.
    """
    fdist.prefer_cpu_accelerator_if_no_cuda()
    if not zero.skip_shm_op_build():
        return None
    if "LOCAL_RANK" not in os.environ:  # one process without a launcher: a world of one (DeepSpeed would try MPI)
        fdist.default_rendezvous_env()
    from accelerate import PartialState

    before = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo", timeout=fdist.collective_timeout(timeout_minutes))
    finally:
        if before is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = before
    return {"use_configured_state": True}


class _TorchOptimizerEngine:
    """What fisher.collect_scores and enforce.MaskEnforcer use of a DeepSpeed engine, for a plain torch
    optimizer (Trainer without DeepSpeed: one process or DDP). Behaves as ZeRO stage 0 in fp32: the
    optimizer updates the parameters themselves, which are the fp32 masters."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.module = module
        self.optimizer = self.basic_optimizer = optimizer

    @staticmethod
    def zero_optimization_stage() -> int:
        return 0


def _torch_optimizer(opt):
    """The torch optimizer inside accelerate's AcceleratedOptimizer wrapper(s)."""
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def fish_section(**kwargs) -> FishSection:
    """FishCallback's selection arguments as the validated `fish:` section (fishds/fish/config.FishSection), or
    FishError. fish.head_steps (head-only steps before the rest, a loop of `fishds train`) is refused: the Trainer owns
    its loop."""
    try:
        section = FishSection(**kwargs)
    except ValidationError as e:
        problems = "; ".join(
            err["msg"].removeprefix("Value error, ").replace("fish: ", "").replace("fish.", "")
            if err["type"] == "value_error"
            else f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
            for err in e.errors()
        )
        raise FishError(f"FishCallback: {problems}") from None
    if section.head_steps:
        raise FishError(
            f"FishCallback: head_steps={section.head_steps} (fish.head_steps) is not supported: the Trainer owns its "
            "training loop, so FishCallback cannot train the classification head alone first; run a head-only "
            "Trainer first (only the head trainable), or use `fishds train` with fish.head_steps"
        )
    return section


class FishCallback(TrainerCallback):
    """Fix a FISH mask over the Trainer model's trainable PEFT tensors and keep every other entry frozen.

    keep_ratio / num_selected: k = floor(keep_ratio * pool) or k itself (keep_ratio 0.5 if neither).
    num_samples: N examples for the Fisher scores, a `seed` permutation of the scoring dataset
        (default: the Trainer's train_dataset), collated with the Trainer's data_collator.
    selection: fisher (top-k Fisher, the paper), random, lowest (ablations), dense (no mask); score,
        allocation, control: the rest of the rule (fishds/fish/rules.py), defaults as in `fishds train`.
    granularity: sample (per-example squared gradients) or batch (per micro-batch of
        per_device_train_batch_size examples, cheaper).
    per_example: batched (default: per-example gradients of a whole micro-batch from one pass,
        fishds/fish/per_example.py)
        or loop (one pass per example); same scores.
    warmup_steps: dense Trainer steps before scoring (fish.dense_steps); unselected entries are then reset to their
        values at the start of training. None (default): fishds' rule, min(20, a fifth of the Trainer's max_steps),
        at least 1; 0 scores at initialisation (the paper).
    pool_include / pool_exclude: regexes on parameter names; excluded trainable tensors train fully.
    mask_path: use this fish_mask.safetensors instead of scoring.
    regrow_every: 0 only; mask regrowth (fish.regrow_every) is a `fishds train` feature, refused here.
    """

    def __init__(
        self,
        keep_ratio: float | None = None,
        num_selected: int | None = None,
        num_samples: int = 64,
        selection: str | None = None,
        granularity: str = "sample",
        warmup_steps: int | None = None,
        seed: int = 0,
        per_example: str = "batched",
        scoring_dataset=None,
        pool_include=(),
        pool_exclude=(),
        mask_path: str | None = None,
        output_dir: str | None = None,
        save_initial_adapter: bool = True,
        score: str | None = None,
        allocation: str | None = None,
        control: str | None = None,
        trainer=None,
        regrow_every: int = 0,
    ):
        if regrow_every:
            raise FishError(
                f"FishCallback: regrow_every={regrow_every}: mask regrowth (fish.regrow_every) is supported by "
                "`fishds train` only; the callback keeps the mask fixed (regrow_every=0)"
            )
        rule_args = dict(selection=selection, score=score, allocation=allocation, control=control)
        self.fish = fish_section(
            keep_ratio=keep_ratio,
            num_selected=num_selected,
            num_samples=num_samples,
            **{k: v for k, v in rule_args.items() if v is not None},  # unset: the defaults of `fishds train`
            granularity=granularity,
            **({} if warmup_steps is None else {"dense_steps": warmup_steps}),
            seed=seed,
            per_example=per_example,
            pool_include=list(pool_include),
            pool_exclude=list(pool_exclude),
            mask_path=mask_path,
        )
        fdist.prefer_cpu_accelerator_if_no_cuda()  # before the Trainer or fishds imports deepspeed
        self.scoring_dataset, self.output_dir, self.save_initial = scoring_dataset, output_dir, save_initial_adapter
        self.masks: dict[str, torch.Tensor] | None = None  # parameter name -> bool mask, once fixed
        self.report: dict = {}
        self.enforcer: MaskEnforcer | None = None
        self.trainer = None
        self._initial = None
        if trainer is not None:
            self.attach(trainer)

    # ---- the validated `fish:` section, read-only ----------------------------------------------------------
    keep_ratio = property(lambda self: self.fish.keep_ratio)
    num_selected = property(lambda self: self.fish.num_selected)
    num_samples = property(lambda self: self.fish.num_samples)
    selection = property(lambda self: self.fish.selection)
    score = property(lambda self: self.fish.score)
    allocation = property(lambda self: self.fish.allocation)
    control = property(lambda self: self.fish.control)
    granularity = property(lambda self: self.fish.granularity)
    warmup_steps = property(lambda self: self.fish.dense_steps)  # the callback's name of fish.dense_steps
    seed = property(lambda self: self.fish.seed)
    per_example = property(lambda self: self.fish.per_example)
    pool_include = property(lambda self: self.fish.pool_include)
    pool_exclude = property(lambda self: self.fish.pool_exclude)
    mask_path = property(lambda self: self.fish.mask_path)

    # ---- the Trainer and its engine -------------------------------------------------------------------------
    def attach(self, trainer) -> "FishCallback":
        """Register with `trainer` and remember it; returns self."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def _attached(self):
        if self.trainer is None:
            raise FishError(
                "FishCallback could not find its Trainer: build the Trainer, then call fish.attach(trainer) (or "
                "pass FishCallback(..., trainer=trainer)) before trainer.train()"
            )
        return self.trainer

    def _engine(self, trainer):
        """The DeepSpeed engine, or the torch-optimizer stand-in; FishError if the Trainer is not ready."""
        if trainer.optimizer is None:
            raise FishError(
                "FishCallback was called before the Trainer created its optimizer (and DeepSpeed "
                "engine); the mask is fixed at on_train_begin, inside trainer.train()"
            )
        if getattr(trainer, "is_deepspeed_enabled", False):
            from deepspeed import DeepSpeedEngine

            engine = trainer.model_wrapped
            if not isinstance(engine, DeepSpeedEngine):
                raise FishError(
                    "FishCallback was called before the Trainer built its DeepSpeed engine "
                    f"(trainer.model_wrapped is a {type(engine).__name__}); it must run at on_train_begin"
                )
            return engine
        if getattr(trainer, "is_fsdp_enabled", False):
            raise FishError("FishCallback supports DeepSpeed (ZeRO 0-3), DDP and one process, not FSDP")
        opt = _torch_optimizer(trainer.optimizer)
        if not isinstance(opt, torch.optim.Optimizer):
            raise FishError(f"FishCallback cannot find the torch optimizer inside {type(trainer.optimizer).__name__}")
        return _TorchOptimizerEngine(trainer.model, opt)

    # ---- pool, data, selection --------------------------------------------------------------------------
    def _pools(self, model) -> tuple[Pool, Pool]:
        if not any(p.requires_grad for p in model.parameters()):
            raise FishError(
                "the Trainer's model has no trainable parameters: FishCallback selects inside PEFT "
                "adapter tensors; wrap the model with peft.get_peft_model(model, LoraConfig(...)) first"
            )
        if not hasattr(model, "peft_config"):
            raise FishError(
                f"the Trainer's model ({type(model).__name__}) is not a PEFT model: FishCallback selects "
                "inside PEFT adapter tensors; wrap it with peft.get_peft_model(model, LoraConfig(...))"
            )
        try:
            pool = Pool.from_model(model, self.pool_include, self.pool_exclude)
        except ValueError as e:
            raise FishError(str(e).replace("fish.", "FishCallback ")) from None
        return pool, Pool.from_model(model)

    def _scoring_data(self, trainer):
        data = self.scoring_dataset if self.scoring_dataset is not None else trainer.train_dataset
        if data is None or not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
            raise FishError(
                "FishCallback needs a map-style dataset (len and indexing) to draw the Fisher examples "
                "from: pass scoring_dataset=... (the Trainer's train_dataset is missing or iterable)"
            )
        try:
            import datasets

            if isinstance(data, datasets.Dataset) and hasattr(trainer, "_remove_unused_columns"):
                data = trainer._remove_unused_columns(data, description="FISH scoring")
        except ImportError:
            pass
        collator = trainer.data_collator
        labels = list(getattr(trainer, "label_names", None) or ["labels"])

        def collate(examples):
            batch = {k: v for k, v in dict(collator(examples)).items() if torch.is_tensor(v)}
            if not any(n in batch for n in labels):
                raise FishError(
                    f"the Trainer's data_collator gives no {labels} for the Fisher pass: the scores need "
                    "the model's loss on true labels (model(**batch).loss)"
                )
            return batch

        return data, collate

    @staticmethod
    def _check_args(args) -> None:
        gc_kwargs = getattr(args, "gradient_checkpointing_kwargs", None) or {}
        if getattr(args, "gradient_checkpointing", False) and gc_kwargs.get("use_reentrant") is True:
            raise FishError(
                "the Fisher pass takes gradients with torch.autograd.grad, which reentrant gradient "
                "checkpointing does not support: set "
                "gradient_checkpointing_kwargs={'use_reentrant': False} (TRL's SFTTrainer forces reentrant "
                "checkpointing for PEFT under ZeRO-3: there set gradient_checkpointing=False, or use ZeRO-2)"
            )

    def _out_dir(self, args) -> Path:
        return Path(self.output_dir or args.output_dir)

    def fix_mask(self, trainer, mask_path: str | None = None) -> dict[str, torch.Tensor]:
        """Score and select (or read `mask_path`), then start enforcing, through the method core's front door
        (fish.selection.fix_mask, as `fishds train`). Called by the events; public for loops that drive a Trainer's
        engine themselves (after the optimizer / DeepSpeed engine exists)."""
        engine = self._engine(trainer)
        pool, trainable = self._pools(engine.module)
        self._check_args(trainer.args)
        mask_path = mask_path or self.fish.mask_path
        if mask_path and not Path(mask_path).is_file():
            raise FishError(
                f"no FISH mask file at {mask_path} (resuming at step {trainer.state.global_step}: "
                "pass FishCallback(mask_path=<checkpoint>/fish_mask.safetensors) of the run resumed)"
            )
        try:
            k = budget(self.fish, pool, trainable.size)["k"]
        except ConfigError as e:
            raise FishError(f"FishCallback: {e}") from None
        examples, collate = (None, None) if mask_path else self._scoring_data(trainer)
        try:
            fixed = fix_core(
                self.fish,
                engine=engine,
                pool=pool,
                trainable=trainable,
                k=k,
                examples=examples,
                collate=collate,
                micro_batch_size=trainer.args.per_device_train_batch_size,
                out=self._out_dir(trainer.args),
                initial=self._initial,
                mask_path=mask_path,
                save_initial=self.save_initial,
                write=not mask_path,
                extra=dict(
                    warmup_steps=self.warmup_steps,
                    world_size=fdist.world_size(),
                    zero_stage=engine.zero_optimization_stage(),
                    step=trainer.state.global_step,
                ),
                banner=f"FISH mask fixed at step {trainer.state.global_step}",
            )
        except MaskFileError as e:
            raise FishError(str(e)) from None
        self._initial = None
        self.masks, self.report, self.enforcer = fixed.masks, fixed.report, fixed.enforcer
        return fixed.masks

    # ---- Trainer events --------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._attached()
        if self.masks is not None:
            raise FishError("this FishCallback already fixed a mask; use a new FishCallback for another train()")
        self.fish = self.fish.resolved(state.max_steps)  # fish.dense_steps unset: the default for this run
        if state.global_step > 0 and state.global_step >= self.warmup_steps and not self.mask_path:
            # resumed from a checkpoint written after the mask was fixed: its mask, not new scores
            self.fix_mask(trainer, str(Path(args.output_dir) / f"checkpoint-{state.global_step}" / MASK_FILE))
        elif self.warmup_steps and state.global_step < self.warmup_steps and not self.mask_path:
            engine = self._engine(trainer)
            self._initial = gather_adapter(self._pools(engine.module)[0])
            fdist.print0(f"[fishds] FISH warm-up: {self.warmup_steps} dense steps before scoring")
        else:
            self.fix_mask(trainer)

    def on_step_end(self, args, state, control, **kwargs):
        if self.masks is None and state.global_step >= self.warmup_steps:
            self.fix_mask(self._attached())

    def on_train_end(self, args, state, control, **kwargs):
        """Rank 0: the model card (README.md) beside the mask, for `huggingface-cli upload` (PEFT's save_model later
        adds its own fields to it)."""
        if self.masks is None or not fdist.is_main():
            return
        from ..card import write_model_card
        from ..fish import rules

        model = self._attached().model
        peft_cfg = next(iter(getattr(model, "peft_config", {}).values()), None)
        logged = [h for h in state.log_history if any(k.startswith("eval_") for k in h)]
        metrics = {k: v for k, v in (logged[-1] if logged else {}).items() if k.startswith("eval_")}
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        if losses:
            metrics["train_loss (last step)"] = losses[-1]
        write_model_card(
            self._out_dir(args),
            base_model=getattr(peft_cfg, "base_model_name_or_path", None) or "unknown",
            method=str(getattr(peft_cfg, "peft_type", "peft")).split(".")[-1].lower(),
            rule=self.report.get("selection", rules.label(self.fish)),
            k=self.report.get("k", self.report.get("selected")),
            pool=self.report.get("pool_size"),
            seeds={"TrainingArguments.seed": args.seed, "FishCallback seed": self.fish.seed},
            metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            trained_with=f"{type(self._attached()).__name__} + fishds FishCallback",
        )

    def on_save(self, args, state, control, **kwargs):
        if self.masks is not None and fdist.is_main():
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                save_mask_file(self._attached().model, ckpt, self.masks)


__all__ = ["FishCallback", "FishError", "prepare_cpu_deepspeed", "MASK_FILE"]
