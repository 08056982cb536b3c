"""Merge a trained PEFT adapter into its base model: a plain Hugging Face model folder, no PEFT needed to load it.

    merge_adapter(base_model_path, adapter_dir, out_dir, dtype=None) -> out_dir

The base is a model folder or a Hugging Face Hub id (resolved with fishds/hub.py: the local HF cache offline);
`dtype` None = the base model's own (config.json dtype / torch_dtype, float32 when it names none). A QLoRA
adapter (the run's fishds_config.yaml says quant.bits=4) is merged into the dequantized 4-bit base: the base
is quantized as in training, dequantized to `dtype`, and the adapter folded in, so the merged weights are the
ones the adapter was trained against (cost: one 4-bit copy of the base during the load, as in training).

The base is loaded with AutoModelForCausalLM, or AutoModelForSequenceClassification for a SEQ_CLS adapter
(classes from the run's fish_report.json labels; trust_remote_code off), the adapter with
PeftModel.from_pretrained, then merge_and_unload() folds it into the weights (every PEFT method fishds
trains supports merging; a fishds bottleneck adapter adds layers and cannot be merged). The model and the
tokenizer (the adapter folder's when it has one, else the base's) are written into a temporary folder
next to out_dir, which is renamed into place only when complete: out_dir is never left half written.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
import time
from pathlib import Path

from .files import REPORT_FILE

DTYPES = ("float32", "bfloat16", "float16")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class MergeError(ValueError):
    """A bad argument of merge_adapter: `arg` names it (base_model_path, adapter_dir, out_dir, dtype)."""

    def __init__(self, arg: str, value, reason: str):
        super().__init__(f"{arg}={str(value)!r}: {reason}")
        self.arg, self.value, self.reason = arg, value, reason


def _inside(a: Path, b: Path) -> bool:
    """a is b or inside b."""
    return a == b or b in a.parents


def resolve_base(base_model_path) -> Path:
    """A base model folder: the path itself, or the Hub snapshot of an org/name id (MergeError when neither)."""
    from .config import ConfigError
    from .hub import is_hub_name, resolve_model

    name = str(base_model_path)
    if Path(name).is_dir() or not is_hub_name(name):
        return Path(name)
    try:
        return Path(resolve_model(name, "base_model_path"))
    except ConfigError as e:
        raise MergeError("base_model_path", name, str(e).split(": ", 1)[-1]) from None


def base_dtype(base: Path) -> str:
    """The dtype the base model's config.json names (dtype, or torch_dtype before transformers 5), else float32."""
    import json

    try:
        conf = json.loads((Path(base) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    name = str(conf.get("dtype") or conf.get("torch_dtype") or "float32").replace("torch.", "")
    return name if name in DTYPES else "float32"


def run_config(adapter: Path):
    """The fishds run config beside an adapter (output_dir, or output_dir/checkpoints/step-N), or None."""
    from .config import ConfigError, load_config
    from .files import RUN_CONFIG

    for folder in (adapter, adapter.parent.parent):
        if (folder / RUN_CONFIG).is_file():
            try:
                return load_config(folder / RUN_CONFIG)
            except ConfigError:
                return None
    return None


QLORA_NOTE = (
    "[fishds] merging a QLoRA adapter into the dequantized {type} base ({dtype}): the merged model equals the "
    "quantized model + adapter it was trained as (quality as evaluated in training), not a full-precision "
    "fine-tune; the 4-bit rounding error of every base weight stays in the merged weights (for NF4 typically a "
    "small rise in perplexity against the unquantized base). Merging into the original full-precision base "
    "instead would put the adapter on weights it was never trained against."
)


def check_inputs(base_model_path, adapter_dir, out_dir, dtype: str = "float32", overwrite: bool = False) -> None:
    """Every check that needs no weights; raises MergeError naming the argument."""
    base, adapter, out = Path(base_model_path), Path(adapter_dir), Path(out_dir)
    if not base.is_dir():
        raise MergeError("base_model_path", base, "no such folder")
    if not (base / "config.json").is_file():
        raise MergeError("base_model_path", base, "not a model folder (no config.json)")
    if not adapter.is_dir():
        raise MergeError("adapter_dir", adapter, "no such folder")
    if (adapter / "bottleneck_config.json").is_file() and not (adapter / ADAPTER_CONFIG).is_file():
        raise MergeError(
            "adapter_dir",
            adapter,
            "a fishds bottleneck adapter adds layers and cannot be merged into "
            "the base weights; load it with fishds.bottleneck.load_bottleneck",
        )
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise MergeError("adapter_dir", adapter, f"no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
    if not any((adapter / w).is_file() for w in ADAPTER_WEIGHTS):
        raise MergeError("adapter_dir", adapter, f"no {ADAPTER_WEIGHTS[0]}")
    if dtype not in DTYPES:
        raise MergeError("dtype", dtype, f"must be one of {', '.join(DTYPES)}")
    if out.exists() and not out.is_dir():
        raise MergeError("out_dir", out, "exists and is not a folder")
    o = out.resolve()
    for what, p in (("base model", base), ("adapter", adapter)):
        if _inside(p.resolve(), o):  # writing there would replace (or hide) an input
            raise MergeError("out_dir", out, f"is or contains the {what} folder {p}; choose a separate folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MergeError(
            "out_dir", out, "exists and is not empty; choose another folder or pass overwrite=True (--overwrite)"
        )


def merge_adapter(
    base_model_path, adapter_dir, out_dir, dtype: str | None = None, overwrite: bool = False, log=print
) -> Path:
    """Base + adapter -> merged model and tokenizer in out_dir (safetensors). Returns out_dir."""
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    base_path = resolve_base(base_model_path)
    dtype = dtype or base_dtype(base_path)
    check_inputs(base_path, adapter_dir, out_dir, dtype, overwrite)
    adapter, out = Path(adapter_dir), Path(out_dir)
    torch_dtype = getattr(torch, dtype)
    run_cfg = run_config(adapter)
    qlora = run_cfg is not None and run_cfg.quant.bits == 4
    auto, kwargs = AutoModelForCausalLM, {}
    if json.loads((adapter / ADAPTER_CONFIG).read_text()).get("task_type") == "SEQ_CLS":
        report = adapter / REPORT_FILE
        labels = json.loads(report.read_text()).get("labels") if report.is_file() else None
        if not labels:
            raise MergeError(
                "adapter_dir",
                adapter,
                "is a sequence-classification adapter without the "
                f"{REPORT_FILE} that names its classes; merge it with peft and num_labels yourself",
            )
        auto = AutoModelForSequenceClassification
        kwargs = {
            "num_labels": len(labels),
            "id2label": {i: str(v) for i, v in enumerate(labels)},
            "label2id": {str(v): i for i, v in enumerate(labels)},
        }
    if qlora:
        from . import quant

        kwargs.update(quant.load_kwargs(run_cfg))
        log(QLORA_NOTE.format(type=run_cfg.quant.type, dtype=dtype))
    try:
        model = auto.from_pretrained(str(base_path), dtype=torch_dtype, trust_remote_code=False, **kwargs)
        if qlora:
            model = model.dequantize(dtype=torch_dtype)
    except Exception as e:  # noqa: BLE001 - report the loader's failure against the argument
        raise MergeError(
            "base_model_path",
            base_path,
            f"cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
        ) from e
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except Exception as e:  # noqa: BLE001 - a mismatched adapter (other base, shapes) is the usual cause
        raise MergeError(
            "adapter_dir",
            adapter,
            f"cannot be applied to {base_path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
        ) from e
    merged = peft_model.merge_and_unload()
    merged.eval()
    tok_src = adapter if any((adapter / f).is_file() for f in TOKENIZER_FILES) else base_path
    has_tokenizer = any((tok_src / f).is_file() for f in TOKENIZER_FILES)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.merging-"))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the result is an ordinary folder
        save_kwargs = {}
        if "safe_serialization" in inspect.signature(merged.save_pretrained).parameters:
            save_kwargs["safe_serialization"] = True  # transformers < 5; 5.x writes safetensors only
        merged.save_pretrained(str(tmp), **save_kwargs)
        if has_tokenizer:
            AutoTokenizer.from_pretrained(str(tok_src), trust_remote_code=False).save_pretrained(str(tmp))
        _move_into_place(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished tmp folder to out; an existing out (checked empty, or overwrite) is moved aside first
    and deleted only after the rename."""
    old = None
    if out.is_dir():
        if any(out.iterdir()) and not overwrite:  # appeared while merging
            raise MergeError("out_dir", out, "exists and is not empty; pass overwrite=True (--overwrite)")
        old = out.with_name(f".{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)  # put the earlier folder back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
