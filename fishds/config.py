"""The fishds run configuration: one YAML file, every field documented where it is defined.

Load with `load_config(path, overrides)`; overrides are `section.key=value` strings (values parsed as
YAML, so `fish.keep_ratio=0.1`, `peft.target_modules=[q_proj,v_proj]`). Everything here is checked
before any model weights load; `ConfigError` names the key and says what to change.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from .fish.config import CHOICES, DEFAULT_DENSE_STEPS, FishSection  # noqa: F401  (the `fish:` section lives there)
from .methods import METHODS
from .run.formats import FORMATS
from .schema import ConfigError  # the error type of every section (fishds/schema.py), importable from here
from .schema import Section as _Section


class ModelSection(_Section):
    name_or_path: str = Field(
        description="Local folder of a Hugging Face model (config.json + weights + tokenizer): "
        "a causal LM, or an encoder/decoder for data.format=classification. Special values: "
        "'smollm2-135m-instruct' (the embedded default) and 'all-minilm-l6-v2' (a BERT encoder)."
    )
    trust_remote_code: bool = Field(False, description="Allow the model folder's own Python code. Off unless set.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = Field(
        "sdpa",
        description="Attention kernel, passed to from_pretrained: sdpa (PyTorch's scaled_dot_product_attention), "
        "eager, flash_attention_2 (pip install flash-attn) or flash_attention_3 (flash_attn_interface), both on a "
        "CUDA GPU only. With data.packing, flash kernels read the restarting position_ids (no s x s mask); sdpa and "
        "eager get a block-diagonal mask of micro_batch x s^2 entries. A backend that is not installed is refused "
        "before weights load.",
    )


PEFT_METHODS = tuple(METHODS)  # the table of PEFT methods: fishds/methods.py


class PeftSection(_Section):
    method: Literal[PEFT_METHODS] = Field(
        "lora",
        description="PEFT method whose added tensors form the FISH pool: lora, dora (magnitude vector in the "
        "pool), rslora (alpha/sqrt(r) scaling), pissa and olora (non-zero B at init), ia3, loha, lokr, vera, "
        "bottleneck (Houlsby/Pfeiffer adapters built by fishds).",
    )
    r: int = Field(8, gt=0, description="Rank (lora, dora, rslora, pissa, olora, loha, lokr, vera).")
    alpha: float = Field(16.0, gt=0, description="Alpha (lora-family scaling = alpha / r; loha, lokr).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Adapter dropout probability (off during the Fisher pass).")
    placement: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby",
        description="bottleneck only: houlsby = after attention and MLP outputs, pfeiffer = after the MLP "
        "output; peft.r is the bottleneck width and target_modules is not used.",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full beside the adapter "
        "(e.g. [lm_head] or a classifier head); add them to fish.pool_exclude to keep "
        "them out of the mask while counting them in the budget.",
    )
    target_modules: Union[list[str], str] = Field(
        "all-linear", description="Module name suffixes to adapt, or 'all-linear'. Must match at least one module."
    )


class QuantSection(_Section):
    bits: Optional[Literal[4]] = Field(
        None,
        description="4: load the frozen backbone quantized to 4 bits with "
        "bitsandbytes (QLoRA); null (the default): no quantization.",
    )
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: nf4 (NormalFloat, QLoRA's) or fp4.")
    double_quant: bool = Field(
        False,
        description="Quantize the per-block scales too (bnb_4bit_use_double_quant): about 0.37 fewer bits per weight.",
    )
    compute_dtype: Optional[Literal["fp32", "bf16"]] = Field(
        None,
        description="dtype the 4-bit weights are dequantized to for each matmul (null = train.precision, "
        "after train.precision=auto is resolved).",
    )
    storage_dtype: Optional[Literal["uint8", "fp32", "bf16"]] = Field(
        None,
        description="dtype the packed 4-bit values are stored in (bnb_4bit_quant_storage; null = the compute "
        "dtype). uint8, fp32 and bf16 all partition under ZeRO-3 here; fp32 is refused with train.precision=bf16 "
        "(DeepSpeed would cast the packed values).",
    )


SCORES, ALLOCATIONS, CONTROLS = (CHOICES[k] for k in ("score", "allocation", "control"))  # fishds/fish/config.py


class DatasetEntry(_Section):
    """One training dataset of data.datasets; keys left out take the data section's value."""

    path: str = Field(description="A file or folder as data.path takes, or a Hugging Face Hub dataset name org/name.")
    weight: float = Field(
        1.0,
        gt=0,
        description="Copies of this dataset in the mix: 2 = every example twice, 0.5 = a seeded half of them.",
    )
    format: Optional[Literal[tuple(FORMATS)]] = None
    text_field: Optional[str] = None
    label_field: Optional[str] = None
    messages_field: Optional[str] = None
    role_field: Optional[str] = None
    content_field: Optional[str] = None
    role_map: Optional[dict[str, str]] = None
    chat_template: Optional[str] = None
    train_turns: Optional[Literal["assistant", "last", "all"]] = None
    max_examples: Optional[int] = Field(None, gt=0)
    subset: Optional[str] = Field(None, description="As data.subset, for this dataset.")
    split: Optional[str] = Field(None, description="As data.split, for this dataset.")
    data_files: Optional[Union[str, list[str], dict[str, Union[str, list[str]]]]] = Field(
        None, description="As data.data_files, for this dataset."
    )


class DataSection(_Section):
    path: Optional[str] = Field(
        None,
        description="Training data: a local .jsonl, .json, .csv, .parquet or .arrow file (or a glob of such "
        "shards), a folder saved by datasets (save_to_disk), a dataset folder laid out as on the Hub, or a Hugging "
        "Face Hub dataset name org/name (from the local HF cache offline); the split is data.split (default "
        "train), with data.subset and data.data_files. Read with datasets (fishds/run/splits.py). The built-in "
        "task names rotten_tomatoes (the embedded default), spam_assassin, "
        "convention_2012 and first_names prepare that task from registry packages (train split; validation "
        "as data.eval_path). Required unless data.datasets is given.",
    )
    format: Literal[tuple(FORMATS)] = Field(
        "alpaca",
        description="alpaca: instruction, input (optional), output; loss on the output. chat: messages "
        "rendered with the tokenizer's chat template; loss on assistant turns. text: causal-LM loss on every token. "
        "classification: text + label; trains a sequence-classification head (encoder or decoder), the head "
        "always trained and counted in the budget.",
    )
    eval_path: Optional[str] = Field(
        None,
        description="Evaluation data in the same format, as data.path takes (optional); its split is "
        "data.eval_split_name (default 'validation', else 'test').",
    )
    eval_split: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Without eval_path: hold out this fraction of the "
        "training rows (fixed seed 0, the same for every train.seed) as evaluation data.",
    )
    test_path: Optional[str] = Field(
        None,
        description="Test data in the same format, evaluated once at the end "
        "(metrics prefixed test_); never used for selection or during training.",
    )
    text_field: str = Field("text", description="Column with the text (text and classification formats).")
    label_field: str = Field("label", description="Column with the class, an int or a string (classification).")
    messages_field: str = Field("messages", description="Column with the conversation (chat format).")
    packing: bool = Field(
        False,
        description="Pack whole training examples (in order, never cut) into blocks of at "
        "most max_length tokens, each example attending only to itself (position ids restart per "
        "example; a block-diagonal mask, or varlen flash-attention); the Fisher pass and evaluation "
        "use unpacked examples (alpaca, chat, text). Not for classification.",
    )
    max_length: int = Field(256, gt=8, description="Token limit per example; longer examples are truncated.")
    max_examples: Optional[int] = Field(None, gt=0, description="Use only the first rows of the training file.")
    max_eval_examples: Optional[int] = Field(200, gt=0, description="Use only the first rows of the eval file.")
    max_test_examples: Optional[int] = Field(
        None, gt=0, description="Use only the first rows of the test file (default: all)."
    )
    role_field: str = Field(
        "role", description="Key of a turn's role in each message (chat format); 'from' for ShareGPT data."
    )
    content_field: str = Field(
        "content", description="Key of a turn's text in each message (chat format); 'value' for ShareGPT data."
    )
    role_map: dict[str, str] = Field(
        default_factory=lambda: {"human": "user", "gpt": "assistant"},
        description="Role names of the data -> chat-template roles (user, assistant, "
        "system); roles not listed are kept. The default maps ShareGPT's human / gpt.",
    )
    chat_template: Optional[str] = Field(
        None,
        description="Chat template to render with instead of the tokenizer's: "
        "a Jinja string, or the path of a file holding one (chat format, and the "
        "alpaca prompt).",
    )
    train_turns: Literal["assistant", "last", "all"] = Field(
        "assistant",
        description="Which tokens of a conversation are learned (chat format): assistant = every "
        "assistant turn, last = the last assistant turn only, all = every token of the rendered conversation.",
    )
    datasets: list[DatasetEntry] = Field(
        default_factory=list,
        description="Several training datasets mixed in one run, instead of data.path: a list "
        "of {path, weight, and any of format, text_field, label_field, messages_field, role_field, content_field, "
        "role_map, chat_template, train_turns, max_examples} (the rest from this section). Each is row-checked before "
        "weights load; the mix holds each dataset weight times (seeded for fractions), shuffled with a fixed seed.",
    )
    subset: Optional[str] = Field(
        None,
        description="The configuration (subset) of a Hugging Face Hub dataset or of a local dataset folder with a "
        "README.md `configs:` list, as datasets.load_dataset's `name` (e.g. 'main' for openai/gsm8k). Applies to "
        "data.path, data.eval_path and data.test_path. Unset: the dataset's default configuration.",
    )
    split: Optional[str] = Field(
        None,
        description="The split of data.path, with optional slicing as datasets writes it: 'train', "
        "'train[:5%]', 'train[1000:2000]'. Unset: 'train'. A single file or glob has the one split 'train'.",
    )
    eval_split_name: Optional[str] = Field(
        None,
        description="The split of data.eval_path (slicing as data.split). Unset: 'validation', else 'test'.",
    )
    test_split_name: Optional[str] = Field(
        None, description="The split of data.test_path (slicing as data.split). Unset: 'test'."
    )
    data_files: Optional[Union[str, list[str], dict[str, Union[str, list[str]]]]] = Field(
        None,
        description="Which files of a Hub dataset or local folder make its splits, as datasets.load_dataset's "
        "data_files: a glob or list (the 'train' split) or {split: glob or list}; paths are relative to the "
        "repository. Only the files of the split used are downloaded and read.",
    )
    num_proc: Optional[int] = Field(
        None,
        gt=0,
        description="Processes that check and tokenise the rows (datasets.map num_proc, on the first rank only). "
        "Unset: min(8, the CPUs this process may use). At most the CPUs available.",
    )

    @model_validator(mode="after")
    def _packing_format(self):
        if (self.path is None) == (not self.datasets):
            raise ValueError(
                "data: give data.path (one dataset) or data.datasets (a list of {path, weight, ...}), "
                "exactly one of them"
            )
        formats = {FORMATS[e.format or self.format].classification for e in self.datasets}
        if len(formats) > 1:
            raise ValueError(
                "data.datasets mixes classification with text-generation formats; a run trains one kind of head"
            )
        if self.datasets and self.eval_split and any(e.weight > 1 for e in self.datasets):
            raise ValueError(
                "data.eval_split with a data.datasets weight above 1 would hold out copies of training "
                "examples; give data.eval_path instead"
            )
        if self.packing and FORMATS[self.format].classification:
            raise ValueError(
                "data.packing=true does not apply to data.format=classification (one label per "
                "example); set data.packing=false"
            )
        if self.eval_split and self.eval_path:
            raise ValueError("data.eval_split and data.eval_path are both set; give one of them")
        return self


SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
)


class TrainSection(_Section):
    max_steps: Optional[int] = Field(
        None,
        gt=0,
        description="Optimizer steps of the whole run, fish.head_steps and fish.dense_steps "
        "included. Wins over train.epochs when both are set; 100 when neither is.",
    )
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    head_lr: Optional[float] = Field(
        None,
        gt=0,
        description="Peak learning rate of the classification head (data.format=classification; the head trains "
        "in full). Unset = train.lr. Lets a comparison raise the adapter's rate (sparse masks may want larger "
        "ones, FISH_TUNING.md 6.4) while the head keeps its own.",
    )
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (masked entries stay fixed anyway).")
    seed: int = Field(0, description="Seed of adapter initialisation, dropout and data order.")
    micro_batch_size: int = Field(4, gt=0, description="Examples per rank per forward pass.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    grad_clip: float = Field(1.0, ge=0, description="Global gradient-norm clipping (0 = off).")
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="Client optimizer, used unless the DeepSpeed JSON names one."
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (optimizer=sgd).")
    scheduler: Literal[SCHEDULERS] = Field(
        "linear",
        description="LR schedule over the run's steps, built by transformers.get_scheduler (the names of "
        "TrainingArguments.lr_scheduler_type): linear, cosine, cosine_with_restarts, polynomial, constant (no "
        "warm-up), constant_with_warmup, inverse_sqrt, cosine_with_min_lr, cosine_warmup_with_min_lr, "
        "warmup_stable_decay. Options of a schedule in train.scheduler_kwargs.",
    )
    lr_warmup_steps: int = Field(0, ge=0, description="LR warm-up steps (linear from 0, as transformers does).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Training precision: auto = bf16 where the GPU supports it, fp32 on CPU (resolved once "
        "when the config loads; fish_report.json records the result). fp16 is not offered.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in backward (non-reentrant) to "
        "save memory; the Fisher pass works with it too.",
    )
    loss_impl: Literal["auto", "chunked", "full", "liger", "cce"] = Field(
        "auto",
        description="Causal-LM cross-entropy (fishds/run/loss.py): chunked = the final hidden states projected to "
        "logits a chunk of target tokens at a time, never more than one chunk's logits held (a frozen lm_head: each "
        "chunk's input gradient computed in its forward; an adapted lm_head: each chunk recomputed in backward); "
        "full = the model's whole (batch x length x vocab) logits, upcast to fp32 (about 12 bytes x "
        "vocab per token: 25 GB at 4 x 4,096 tokens and a 128k vocabulary); liger = liger-kernel's fused linear "
        "cross-entropy (pip install liger-kernel, CUDA); cce = Apple's cut-cross-entropy (pip install "
        "cut-cross-entropy, CUDA, not at ZeRO-3). auto = liger when installed on CUDA and the output embedding is "
        "a plain frozen layer, else chunked. Classification keeps its head's loss.",
    )
    loss_chunk_tokens: Optional[int] = Field(
        None,
        gt=0,
        description="Target tokens per chunk of train.loss_impl=chunked (also the per-example Fisher pass). Unset: "
        "as many as keep one chunk's fp32 logits within 128 MiB (256 tokens at a 128,256-token vocabulary, 682 at "
        "49,152).",
    )
    log_every: int = Field(1, gt=0, description="Print a progress line every this many steps (rank 0).")
    eval_every: int = Field(0, ge=0, description="Evaluate every this many steps (0 = only at the end).")
    save_every: int = Field(
        0,
        ge=0,
        description="Checkpoint every this many optimizer steps after the mask is fixed "
        "(0 = none). Checkpoints go to output_dir/checkpoints/step-N.",
    )
    keep_checkpoints: int = Field(
        2,
        ge=1,
        description="Keep only the newest this many complete checkpoints (and the best one with train.save_best).",
    )
    save_best: bool = Field(
        False,
        description="Keep the checkpoint whose evaluation of train.metric_for_best was best "
        "(never pruned) and write its adapter into output_dir at the end (the last step's adapter "
        "goes to output_dir/last/). Needs train.eval_every and train.save_every a multiple of it.",
    )
    metric_for_best: str = Field(
        "eval_loss",
        description="Evaluation metric for train.save_best and "
        "train.early_stopping_patience: eval_loss, eval_ppl, eval_token_acc (causal LM) or "
        "eval_accuracy (classification); *loss/*ppl lower is better, *accuracy/*acc higher.",
    )
    early_stopping_patience: int = Field(
        0,
        ge=0,
        description="Stop training after this many evaluations in a row "
        "without improvement of train.metric_for_best (0 = never stop early).",
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        ["tensorboard"],
        description="Experiment trackers (rank 0): tensorboard (output_dir/tensorboard), wandb "
        "(WANDB_PROJECT, WANDB_MODE=offline work), mlflow (MLFLOW_TRACKING_URI, default output_dir/mlruns); each gets "
        "the run config, the mask summary and every metric. wandb and mlflow: pip install 'fishds[trackers]'.",
    )
    report_png: bool = Field(
        True,
        description="Draw output_dir/fish_mask_report.png when the run ends (rank 0, matplotlib: 1-3 s of CPU "
        "while the other ranks wait); false skips it, and `fishds report OUTPUT_DIR` draws it later from the outputs.",
    )
    epochs: Optional[float] = Field(
        None,
        gt=0,
        description="Passes over the training data (after packing) when "
        "train.max_steps is not set: steps = ceil(epochs x blocks per epoch / "
        "(micro_batch_size x ranks x grad_accum)); fractions allowed. Metrics record "
        "the epoch of every step.",
    )
    lr_warmup_ratio: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="LR warm-up as a fraction of the run's steps "
        "(ceil(ratio x steps), as transformers); instead of train.lr_warmup_steps.",
    )
    scheduler_kwargs: dict = Field(
        default_factory=dict,
        description="Options of train.scheduler passed to "
        "transformers.get_scheduler (scheduler_specific_kwargs), e.g. {num_cycles: 2} for "
        "cosine_with_restarts, {min_lr_rate: 0.1} for cosine_with_min_lr, "
        "{num_decay_steps: 20} for warmup_stable_decay.",
    )
    max_nonfinite_steps: int = Field(
        0,
        ge=0,
        description="Optimizer steps with a non-finite loss or gradient norm that are skipped (no update on any "
        "rank, counted as nonfinite_steps in metrics.jsonl) before the run stops as diverged (exit code 3, no "
        "adapter written, the last checkpoint kept). 0: the first one stops the run.",
    )
    resume_trust_pickle: bool = Field(
        False,
        description="Resume through DeepSpeed's own engine files (checkpoints/step-N/ds, Python pickles: loading "
        "one runs code of whoever wrote it). Default false: a resume restores from safetensors and JSON only "
        "(world_state.*, rng-rank*, fish_mask, fishds_state.json), on any number of ranks. Set true only for "
        "checkpoints you trust, e.g. ones written by a fishds older than world_state.json.",
    )

    @model_validator(mode="after")
    def _schedule(self):
        if self.lr_warmup_steps and self.lr_warmup_ratio:
            raise ValueError("train.lr_warmup_steps and train.lr_warmup_ratio are both set; give one of them")
        if self.scheduler == "constant" and (self.lr_warmup_steps or self.lr_warmup_ratio):
            raise ValueError(
                "train.scheduler=constant has no LR warm-up (transformers' constant schedule); use "
                "train.scheduler=constant_with_warmup, or drop train.lr_warmup_steps / lr_warmup_ratio"
            )
        return self


class Config(_Section):
    model: ModelSection
    peft: PeftSection = PeftSection()
    quant: QuantSection = QuantSection()
    fish: FishSection = FishSection()
    data: DataSection
    train: TrainSection = TrainSection()
    output_dir: str = Field(description="Where the adapter, mask, report and metrics are written.")
    ds_config: Optional[str] = Field(
        None,
        description="DeepSpeed JSON (the --ds_config flag overrides it). "
        "Default: ds_configs/zero0.json semantics built in.",
    )
    save_initial_adapter: bool = Field(
        True,
        description="Write init_adapter_model.safetensors: the adapter when the "
        "mask was fixed, to verify that masked entries never moved.",
    )
    overwrite: bool = Field(
        False,
        description="Start afresh in an output_dir that holds a finished run or "
        "checkpoints (old checkpoints are moved aside to checkpoints.replaced-<time>, not "
        "deleted).",
    )
    resume: str = Field(
        "auto",
        description="auto: continue from the latest complete checkpoint in output_dir if there "
        "is one; none: never; or the path of a checkpoint folder.",
    )

    @field_validator("output_dir")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("output_dir is empty; give a folder path")
        return v

    @model_validator(mode="after")
    def _across_sections(self):
        """Checks across sections that need no file (those that do run in fishds/run/preflight.py)."""
        if FORMATS[self.data.format].classification and not METHODS[self.peft.method].trains_head:
            raise ValueError(
                f"peft.method={self.peft.method} does not train a classification head; use a PEFT "
                f"method (e.g. lora) with data.format={self.data.format}"
            )
        if self.train.head_lr is not None and not FORMATS[self.data.format].classification:
            raise ValueError(
                f"train.head_lr={self.train.head_lr} applies to a classification head, but data.format="
                f"{self.data.format} trains none; remove train.head_lr"
            )
        f = self.fish
        if not f.dense and f.budget == "match_rank" and f.match_r >= self.peft.r:
            raise ValueError(
                f"fish.match_r={f.match_r} must be below peft.r={self.peft.r} (protocol 1: a larger pool "
                "masked down to the count of a smaller rank)"
            )
        return self


def _set_dotted(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
        node = child
    node[keys[-1]] = value


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, prefix + name + "."))
    return keys


def _explain(err: ValidationError, source: str) -> ConfigError:
    known = _known_keys(Config)
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc, known, n=1, cutoff=0.6)
            hint = (
                f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(k for k in known if '.' in k)}"
            )
            lines.append(f"unknown key {loc!r}{hint}")
        elif e["type"] == "missing":
            lines.append(f"missing required key {loc!r}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            where = f"{loc}: " if loc and not msg.startswith(loc.split(".")[0]) else ""
            lines.append(
                f"{where}{msg} (got {e.get('input')!r})"
                if "input" in e and not isinstance(e.get("input"), dict)
                else f"{where}{msg}"
            )
    return ConfigError(f"invalid configuration in {source}:\n  - " + "\n  - ".join(lines))


def load_config(path: Optional[str | Path], overrides: list[str] = ()) -> Config:
    """Read a YAML file (or nothing), apply `a.b=value` overrides, validate. Raises ConfigError."""
    tree: dict = {}
    source = "overrides"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass --config with a YAML file path")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections (model:, peft:, ...)")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as e:
        raise _explain(e, source) from None
    resolve_precision(cfg)
    return cfg


def resolve_precision(cfg: Config) -> str:
    """Replace train.precision=auto by bf16 (a CUDA GPU with bf16 support) or fp32 (otherwise); returns the value.

    Called once by load_config (and again, a no-op, by preflight for configs built in code)."""
    if cfg.train.precision == "auto":
        import torch

        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        cfg.train.precision = "bf16" if bf16 else "fp32"
    return cfg.train.precision


def config_reference() -> str:
    """A markdown table of every key, its default and its documentation (docs/configuration.md)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, prefix + name + ".")
                continue
            if field.is_required():
                default = "required"
            elif field.default_factory is not None:  # list/dict defaults: the value the factory makes
                default = repr(field.get_default(call_default_factory=True, validated_data={}))
            else:
                default = repr(field.default)
            cells = (default, field.description or "")  # a bare | would end the markdown cell
            rows.append(f"| `{prefix}{name}` | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")

    walk(Config, "")
    return "\n".join(rows)
