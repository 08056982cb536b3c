"""The FISH-LoRA training run, start to finish. Read top to bottom:

1. preflight: every check that can fail without weights (config, files, model, target modules)
2. model + LoRA, DeepSpeed engine (ZeRO 0-3, "auto" values filled from the config)
3. optional dense warm-up, then the Fisher pass and the exact distributed top-k -> masks on every rank
4. masked training: gradient hooks + optimizer wrapper keep unselected entries fixed
5. evaluation and outputs (adapter, mask, initial adapter, report, metrics)
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import dist as fdist
from . import memory, quant, schedule
from .config import Config, ConfigError
from .data import Collator, ShardedBatches, data_counts_line, data_counts_report, load_examples, read_rows
from .dsconfig import resolve_ds_config
from .compact import apply_mask as apply_compact_mask, check_config as check_compact
from .compact import CompactAdamW, check_resumed_state
from .examples import subset
from .formats import pack
from .hub import resolve_dataset
from .mixing import labels_of, mix, read_sources, sources
from .enforce import MaskEnforcer, reset_unselected
from .evaluate import evaluate
from .fisher import collect_scores, gather_scores
from .loss import loss_sum as token_loss_sum, step_targets
from .mask import share_selection
from .model import (NEEDS_BASE_WEIGHTS_AT_INIT, check_model_and_targets, count_trainable, head_patterns,
                    is_classification, load_peft_model, load_tokenizer, resolve_model_path)
from .checkpoint import checkpoint_root, find_resume, load_checkpoint, save_checkpoint
from .outputs import (FINISHED_MARKER, SELECTION_REPORT, MetricsLog, gather_adapter, key_map, mask_report,
                      save_adapter, save_initial_adapter, save_mask_file, write_json)
from .pool import Pool
from .select import exact_topk, float_keys, key_to_float, random_keys


@dataclass
class Plan:
    """What preflight resolved: paths and checked inputs."""
    model_path: str
    data_path: str
    eval_path: str | None
    ds_path: str | None
    output_dir: Path
    resume_from: Path | None = None
    baselines: dict = field(default_factory=dict)  # plain-PEFT rank -> trainable count
    test_path: str | None = None
    labels: list | None = None  # classification: the classes, in class-id order
    data_counts: dict = field(default_factory=dict)  # per data key: rows, truncated, dropped (load_examples)
    sources: list = field(default_factory=list)  # the training sources (mixing.Source): data.path or data.datasets


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


def preflight(cfg: Config, ds_path: str | None) -> Plan:
    """All checks that need no weights; raises ConfigError naming the key."""
    ds_path = ds_path or cfg.ds_config
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / the deepspeed launcher before ranks start
    ds = resolve_ds_config(cfg, ds_path, world)  # fp16, ZeRO stage, scheduler, contradictions: refused up front
    check_compact(cfg, ds)
    schedule.check(cfg)
    quant.check(cfg, ds["zero_optimization"].get("stage", 0))
    if cfg.fish.selection in ("fisher", "lowest") and cfg.fish.num_samples < world:
        raise ConfigError(f"fish.num_samples={cfg.fish.num_samples} is smaller than the {world} ranks; "
                          "every rank needs at least one scoring example")
    d = cfg.data
    data_path, eval_path = d.path, d.eval_path
    if data_path == "rotten_tomatoes":
        from .assets import rotten_tomatoes
        files = rotten_tomatoes("classification" if d.format == "classification" else "alpaca")
        data_path, eval_path = str(files["train"]), eval_path or (None if d.eval_split else str(files["validation"]))
    if cfg.peft.method == "bottleneck" and is_classification(cfg):
        raise ConfigError("peft.method=bottleneck does not train a classification head; use a PEFT method (e.g. lora) "
                          "with data.format=classification")
    srcs = sources(d, data_path)  # data.path or data.datasets, Hub names resolved
    read = read_sources(srcs)
    labels = labels_of(read) if is_classification(cfg) else None
    eval_path, test_path = (resolve_dataset(p, k) if p else None for p, k in ((eval_path, "data.eval_path"),
                                                                              (d.test_path, "data.test_path")))
    for key, path, limit in (("data.eval_path", eval_path, d.max_eval_examples),
                             ("data.test_path", test_path, d.max_test_examples)):
        if path:
            rows = read_rows(path, key, d, limit)
            unknown = sorted({str(r[d.label_field]) for r in rows} - {str(v) for v in labels}) if labels else []
            if unknown:
                raise ConfigError(f"{key}={path!r}: labels {unknown[:5]} (data.label_field={d.label_field!r}) do not "
                                  f"occur in the training file, whose labels are {labels}")
    if cfg.fish.mask_path and not Path(cfg.fish.mask_path).is_file():
        raise ConfigError(f"fish.mask_path={cfg.fish.mask_path!r}: file not found")
    out = Path(cfg.output_dir)
    if (out / FINISHED_MARKER).exists() and not cfg.overwrite:
        raise ConfigError(f"output_dir={cfg.output_dir!r} already holds a finished run ({FINISHED_MARKER}); choose "
                          "another output_dir or set overwrite=true")
    try:
        resume_from = None if cfg.overwrite and cfg.resume == "auto" else find_resume(cfg.resume, out)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    model_path = resolve_model_path(cfg)
    n_labels = len(labels) if labels else None
    check_model_and_targets(cfg, model_path, n_labels)
    return Plan(model_path, srcs[0].path, eval_path, ds_path, out, resume_from,
                baseline_counts(cfg, model_path, n_labels), test_path, labels, sources=srcs)


def baseline_counts(cfg: Config, model_path: str, num_labels: int | None = None) -> dict[int, int]:
    """Trainable counts of plain PEFT at the ranks the budget compares with (meta device, no weights)."""
    f, r = cfg.fish, cfg.peft.r
    if f.selection == "dense":
        return {}
    if f.budget == "match_rank":
        if f.match_r >= r:
            raise ConfigError(f"fish.match_r={f.match_r} must be below peft.r={r} (protocol 1: a larger pool masked "
                              "down to the count of a smaller rank)")
        return {f.match_r: count_trainable(cfg, model_path, f.match_r, num_labels)}
    if f.keep_ratio is not None and (r * f.keep_ratio).is_integer() and 0 < r * f.keep_ratio < r:
        return {int(r * f.keep_ratio): count_trainable(cfg, model_path, int(r * f.keep_ratio), num_labels)}
    return {}


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


def train_step(engine, batches: ShardedBatches, collate, grad_accum: int) -> dict:
    """One optimizer step over grad_accum micro-batches, the loss averaged over all the step's targets on all ranks
    (fishds/loss.py); returns this rank's share of that mean loss, token and target counts."""
    dev = fdist.device()
    loss_sum, grad_norm = 0.0, None
    lr = engine.get_lr()[0]
    raw = [batches.next() for _ in range(grad_accum)]
    tokens = sum(len(e["input_ids"]) for examples in raw for e in examples)
    micro_batches = [collate(examples) for examples in raw]
    targets = step_targets(micro_batches)
    for micro, batch in enumerate(micro_batches):
        batch = {k: v.to(dev) for k, v in batch.items()}
        loss = token_loss_sum(engine, batch) / targets
        engine.backward(loss * fdist.world_size(), scale_wrt_gas=False)
        if micro == grad_accum - 1 and engine.zero_optimization_stage() == 0:
            grad_norm = _dense_grad_norm(engine)  # stage 0 keeps no global norm; grads are reduced here
        engine.step()
        loss_sum += float(loss.detach())
    if grad_norm is None:
        n = engine.get_global_grad_norm()
        grad_norm = None if n is None else float(n.item() if torch.is_tensor(n) else n)
    return {"loss": loss_sum, "tokens": tokens, "targets": targets, "lr": lr, "grad_norm": grad_norm}


def _dense_grad_norm(engine) -> float:
    sq = sum(float(p.grad.float().square().sum()) for p in engine.module.parameters() if p.grad is not None)
    return math.sqrt(sq)


def select_masks(cfg: Config, engine, pool: Pool, k: int, scoring_examples, collate) -> tuple[dict, dict]:
    """Scores -> exact global top-k -> full boolean masks on every rank, with report entries."""
    f = cfg.fish
    info = {"selection": f.selection, "pool_size": pool.size, "k": k}
    start, end = pool.chunk(fdist.rank(), fdist.world_size())
    if f.selection == "dense":
        return {t.name: torch.ones(t.shape, dtype=torch.bool) for t in pool.tensors}, info
    if f.selection == "random":
        keys = random_keys(start, end, f.seed)
        info["collect_seconds"] = 0.0
    else:
        fisher_bar = progress_bar(0, f"Fisher pass ({f.granularity})")

        def advance(done: int, total: int):
            fisher_bar.total = total
            fisher_bar.update(1)
        scores, stats = collect_scores(engine, pool, scoring_examples, f.granularity, cfg.train.micro_batch_size,
                                       collate, progress=advance)
        fisher_bar.close()
        info.update(stats, num_samples=len(scoring_examples), granularity=f.granularity)
        keys = float_keys(scores) if f.selection == "fisher" else -float_keys(scores) - 1
        info["score_stats"] = _score_stats(scores)
        if f.save_scores:
            full = gather_scores(pool, scores)
            if full is not None:
                from safetensors.torch import save_file
                save_file({n: v.contiguous() for n, v in full.items()}, str(Path(cfg.output_dir) / "fisher_scores.safetensors"))
    t0 = time.perf_counter()
    local_sel, threshold = exact_topk(keys, k)
    masks = share_selection(pool, local_sel)
    info["select_seconds"] = time.perf_counter() - t0
    if f.selection in ("fisher", "lowest"):
        info["threshold_score"] = key_to_float(threshold if f.selection == "fisher" else -threshold - 1)
    return masks, info


def _score_stats(local: torch.Tensor) -> dict:
    """Sum, mean, max, count of zeros and a log10 histogram of the scores, reduced over ranks (no gather)."""
    s = torch.tensor([float(local.sum()), float(local.numel()), float((local == 0).sum())], dtype=torch.float64)
    fdist.all_reduce_(s)
    mx = torch.tensor([float(local.max()) if local.numel() else 0.0])
    fdist.all_reduce_(mx, op=torch.distributed.ReduceOp.MAX)
    edges = list(range(-20, 6))  # log10 bin edges; bin i holds scores in [10^edges[i], 10^edges[i+1])
    pos = local[local > 0].double().log10().clamp(edges[0], edges[-1] - 1e-9)
    hist = torch.histc(pos, bins=len(edges) - 1, min=edges[0], max=edges[-1]).to(torch.float64)
    fdist.all_reduce_(hist)
    return {"sum": float(s[0]), "mean": float(s[0] / s[1]), "max": float(mx[0]), "zeros": int(s[2]),
            "log10_histogram": {"edges": edges, "counts": [int(c) for c in hist]}}


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
    total_steps: int = 0  # optimizer steps of the run, fish.dense_steps included (fishds/schedule.py)


def setup(cfg: Config, ds_path: str | None = None) -> Session:
    """Preflight, process group, tokenizer and data, model + LoRA, DeepSpeed engine."""
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
    ds = resolve_ds_config(cfg, plan.ds_path, fdist.world_size())
    zero3_loading = None
    if (ds["zero_optimization"].get("stage", 0) == 3 and cfg.peft.method not in NEEDS_BASE_WEIGHTS_AT_INIT
            and not cfg.peft.modules_to_save and not plan.labels):  # PEFT copies modules_to_save (heads) from weights
        # transformers loads the weights straight into ZeRO-3 partitions (zero.Init) while this object lives
        from transformers.integrations import HfDeepSpeedConfig
        zero3_loading = HfDeepSpeedConfig(ds)  # noqa: F841
    model = load_peft_model(cfg, plan.model_path, dtype, plan.labels, tokenizer.pad_token_id)
    if zero3_loading is not None:
        frozen = [p for p in model.parameters() if not p.requires_grad]
        fdist.print0(f"[fishds] ZeRO-3 loading: {sum(hasattr(p, 'ds_id') for p in frozen)}/{len(frozen)} frozen "
                     "tensors partitioned as they loaded" + (" (transformers loads a 4-bit model whole on every rank; "
                     "deepspeed.initialize partitions it)" if quant.enabled(cfg) else ""))
    exclude = cfg.fish.pool_exclude + head_patterns(cfg)
    pool_before = Pool.from_model(model, cfg.fish.pool_include, exclude)
    budget = plan_budget(cfg, plan.baselines, pool_before, Pool.from_model(model).size)
    k = budget["k"]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      optimizer=_client_optimizer(cfg, ds), lr_scheduler=schedule.scheduler(cfg, steps),
                                      config=ds)
    batches = ShardedBatches(train_blocks, t.micro_batch_size, fdist.rank(), fdist.world_size(), t.seed)
    collate = Collator(tokenizer.pad_token_id, getattr(model.config, "_attn_implementation", None), dtype)
    return Session(cfg, plan, engine, Pool.from_model(engine.module, cfg.fish.pool_include, exclude),
                   Pool.from_model(engine.module), k, budget, examples, eval_examples, collate, batches, test_examples,
                   steps)


def load_data(cfg: Config, plan: Plan, tokenizer) -> tuple[list, list, list]:
    """Training, evaluation and test examples (eval from data.eval_path, or data.eval_split of the training rows)."""
    d = cfg.data

    def load(path, key, limit, data=d):
        if not path:
            return []
        counts = plan.data_counts.setdefault(key, {})
        examples = load_examples(tokenizer, path, key, data, limit, plan.labels, counts=counts)
        fdist.print0(data_counts_line(key, plan.data_counts[key], data.max_length))
        return examples
    parts = [load(s.path, s.key, s.data.max_examples, s.data) for s in plan.sources]
    examples = mix(parts, [s.weight for s in plan.sources])
    if len(parts) > 1:
        fdist.print0("[fishds] training mix: " + ", ".join(f"{round(s.weight * len(p))} of {s.key}"
                                                           for s, p in zip(plan.sources, parts)))
    eval_examples = load(plan.eval_path, "data.eval_path", d.max_eval_examples)
    if d.eval_split:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
        n_eval = max(1, round(len(examples) * d.eval_split))
        if n_eval >= len(examples):
            raise ConfigError(f"data.eval_split={d.eval_split} leaves no training examples of {len(examples)}")
        held = set(order[:n_eval])
        eval_examples = [examples[i] for i in sorted(held)][:d.max_eval_examples]
        examples = subset(examples, [i for i in range(len(examples)) if i not in held])
    return examples, eval_examples, load(plan.test_path, "data.test_path", d.max_test_examples)


def plan_budget(cfg: Config, baselines: dict[int, int], pool: Pool, trainable: int) -> dict:
    """k, and the plain-PEFT baselines it compares with (../shared/FISH_TUNING.md section 1), counted by fishds."""
    f = cfg.fish
    always = trainable - pool.size  # tensors outside the pool train fully and count towards the budget
    out = {"protocol": f.budget, "pool": pool.size, "always_trained": always, "dense_same_rank": trainable}
    if f.selection == "dense":
        k = pool.size
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


def scoring_examples(cfg: Config, examples: list) -> list:
    """The N examples the Fisher pass uses: a fish.seed permutation of the training set, first N."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.fish.seed)).tolist()
    return [examples[i] for i in order[:cfg.fish.num_samples]]


def fix_mask(s: Session, log_step) -> tuple[dict, dict]:
    """Dense warm-up (optional), then scoring and selection, or a mask file: the masks and the report."""
    cfg, engine, pool = s.cfg, s.engine, s.pool
    if cfg.fish.mask_path:
        masks = load_mask_for_pool(s.engine.module, s.trainable, cfg.fish.mask_path)
        return masks, {"selection": f"file {cfg.fish.mask_path}", "pool_size": pool.size,
                       "k": sum(int(m.sum()) for m in masks.values())}
    initial = gather_adapter(pool) if cfg.fish.dense_steps else None
    for step in range(1, cfg.fish.dense_steps + 1):
        t0 = time.perf_counter()
        log_step(step, "dense", train_step(engine, s.batches, s.collate, cfg.train.grad_accum),
                 time.perf_counter() - t0)
    masks, report = select_masks(cfg, engine, pool, s.k, scoring_examples(cfg, s.examples), s.collate)
    if initial is not None:
        reset_unselected(engine, pool, masks, initial)
    return masks, report


def publish_mask(model, trainable: Pool, masks: dict, report: dict, out: Path, save_initial: bool,
                 write: bool = True) -> dict[str, torch.Tensor]:
    """The masks of every trainable tensor (tensors outside the pool train fully: all ones), their statistics
    added to `report`, and, with `write`, on rank 0 the mask file, the selection report and the initial adapter.
    All ranks call it (gathering the initial adapter is a collective)."""
    masks = {t.name: masks.get(t.name, torch.ones(t.shape, dtype=torch.bool)) for t in trainable.tensors}
    report.update(mask_report(trainable, masks))
    fixed = gather_adapter(trainable) if write and save_initial else None
    if write and fdist.is_main():
        save_mask_file(model, out, masks)
        write_json(out / SELECTION_REPORT, report)
        if fixed is not None:
            save_initial_adapter(model, out, fixed)
    return masks


def load_mask_for_pool(model, pool: Pool, path: str) -> dict[str, torch.Tensor]:
    """A fish_mask.safetensors keyed like the adapter, checked against the pool, keyed by parameter name."""
    from .mask import load_masks

    try:
        by_key = load_masks(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"fish.mask_path={path!r}: {e}") from None
    key_of = key_map(model, [t.name for t in pool.tensors])
    missing = sorted(set(key_of.values()) - set(by_key))
    extra = sorted(set(by_key) - set(key_of.values()))
    if missing or extra:
        raise ConfigError(f"fish.mask_path={path!r}: keys do not match the adapter (missing {missing[:3]}, "
                          f"unexpected {extra[:3]}); was it made with the same model, peft.r and target_modules?")
    masks = {}
    for t in pool.tensors:
        m = by_key[key_of[t.name]]
        if tuple(m.shape) != t.shape:
            raise ConfigError(f"fish.mask_path={path!r}: {key_of[t.name]} has shape {list(m.shape)}, the adapter "
                              f"tensor has {list(t.shape)}")
        masks[t.name] = m
    return masks


def progress_bar(total: int, desc: str):
    """A tqdm bar on rank 0 when stderr is a terminal; otherwise disabled (progress lines are printed instead)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not (fdist.is_main() and sys.stderr.isatty()), dynamic_ncols=True)


def first_step_after(resume_from: Path | None) -> int:
    return json.loads((resume_from / "fishds_state.json").read_text())["step"] + 1 if resume_from else 1


def run(cfg: Config, ds_path: str | None = None) -> RunResult:
    s = setup(cfg, ds_path)
    engine, pool, k, collate, batches, eval_examples = s.engine, s.pool, s.k, s.collate, s.batches, s.eval_examples
    t = cfg.train
    total_steps = s.total_steps
    out = s.plan.output_dir
    resume_from = s.plan.resume_from
    metrics = MetricsLog(out / "metrics.jsonl", append=resume_from is not None)
    bar = progress_bar(total_steps, "train")
    fdist.print0(f"[fishds] model {s.plan.model_path} | {cfg.peft.method} pool {pool.size:,} entries in "
                 f"{len(pool.tensors)} tensors | selection {cfg.fish.selection}, k={k:,} | "
                 f"ZeRO-{engine.zero_optimization_stage()} | "
                 f"{fdist.world_size()} rank(s) | {t.precision}")

    def log_step(step: int, phase: str, stats: dict, seconds: float):
        sums = torch.tensor([stats["tokens"], stats["loss"]], dtype=torch.float64)
        fdist.all_reduce_(sums)
        rec = {"step": step, "phase": phase, "loss": float(sums[1]), "lr": stats["lr"],
               "grad_norm": stats["grad_norm"], "tokens": int(sums[0]), "targets": stats["targets"],
               "epoch": schedule.epoch_of(batches.position, len(batches.examples), t.micro_batch_size,
                                          fdist.world_size()), "seconds": seconds}
        metrics.write(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens'] / max(seconds, 1e-9):,.0f}")
        if (step % t.log_every == 0 or step == total_steps) and bar.disable:
            fdist.print0(f"[fishds] {phase} step {step}/{total_steps} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                         f"{rec['tokens'] / max(seconds, 1e-9):,.0f} tok/s, {(total_steps - step) * seconds:.0f}s left")

    bar.update(first_step_after(resume_from) - 1)

    # 3. the mask: from a checkpoint, or warm-up + Fisher pass + exact top-k (or a mask file)
    if resume_from is not None:
        state, masks = load_checkpoint(engine, resume_from)
        check_resumed_state(engine, cfg.fish.compact_optimizer)
        first_step, batches.position = state["step"] + 1, state["data_position"]
        metrics.truncate_after(state["step"])
        report = json.loads((out / SELECTION_REPORT).read_text())
        fdist.print0(f"[fishds] resumed from {resume_from} (step {state['step']})")
    else:
        masks, report = fix_mask(s, log_step)
        first_step = cfg.fish.dense_steps + 1
        report.update(zero_stage=engine.zero_optimization_stage(), world_size=fdist.world_size(),
                      dense_steps=cfg.fish.dense_steps, method=cfg.peft.method, budget=s.budget,
                      **data_counts_report(s.plan.data_counts))
        if s.plan.labels:
            report["labels"] = s.plan.labels  # class id -> label (num_labels for AutoModelForSequenceClassification)
        masks = publish_mask(engine.module, s.trainable, masks, report, out, cfg.save_initial_adapter)
    compact = cfg.fish.compact_optimizer
    enforcer = MaskEnforcer(engine, s.trainable, masks, restore=not compact) if cfg.fish.selection != "dense" else None
    if compact:
        apply_compact_mask(engine, s.trainable, masks)
    fdist.print0(memory.line(memory.measure(engine, masks, enforcer), fdist.world_size()))
    metrics.text("fish/mask", "```\n" + json.dumps({k: v for k, v in report.items() if k != "per_tensor"},
                                                    indent=1) + "\n```")
    fdist.print0(f"[fishds] mask fixed: {report['selected']:,}/{s.trainable.size:,} trainable entries "
                 f"(lora_A {report['share'].get('lora_A', 0):.1%}, lora_B {report['share'].get('lora_B', 0):.1%}); "
                 f"Fisher pass {report.get('collect_seconds', 0):.1f}s, selection {report.get('select_seconds', 0):.2f}s")

    # 4. masked training
    for step in range(first_step, total_steps + 1):
        t0 = time.perf_counter()
        log_step(step, "train", train_step(engine, batches, collate, t.grad_accum), time.perf_counter() - t0)
        if t.eval_every and step % t.eval_every == 0 and step != total_steps:
            metrics.write({"step": step, **evaluate(engine, eval_examples, collate, t.micro_batch_size)})
        if t.save_every and step % t.save_every == 0 and step != total_steps:
            save_checkpoint(engine, out, step, batches.position, masks, t.keep_checkpoints)

    # 5. evaluation and outputs
    eval_metrics = evaluate(engine, eval_examples, collate, t.micro_batch_size)
    eval_metrics.update(evaluate(engine, s.test_examples, collate, t.micro_batch_size, prefix="test"))
    if eval_metrics:
        metrics.write({"step": total_steps, **eval_metrics})
        for prefix, n in (("eval", len(eval_examples)), ("test", len(s.test_examples))):
            if f"{prefix}_loss" in eval_metrics:
                acc = eval_metrics.get(f"{prefix}_accuracy", eval_metrics.get(f"{prefix}_token_acc"))
                what = "accuracy" if f"{prefix}_accuracy" in eval_metrics else "response-token accuracy"
                fdist.print0(f"[fishds] {prefix} loss {eval_metrics[f'{prefix}_loss']:.4f}, {what} {acc:.1%} on "
                             f"{n} examples")
    adapter = gather_adapter(s.trainable)
    report["eval"] = eval_metrics
    report["memory_per_rank"] = memory.gather(memory.measure(engine, masks, enforcer))  # after training: real state
    if fdist.is_main():
        save_adapter(engine.module, out, adapter)
        write_json(out / FINISHED_MARKER, report)
        try:  # the run is finished; a failed plot must not fail it
            from .report import write_report_png
            print(f"[fishds] mask report: {write_report_png(out)}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"[fishds] warning: fish_mask_report.png not written ({e})", flush=True)
        print(f"[fishds] adapter written to {out.resolve()} (load with peft.PeftModel.from_pretrained)", flush=True)
    fdist.barrier()
    return RunResult(engine, pool, masks, report, eval_metrics, collate, eval_examples, s.test_examples)
