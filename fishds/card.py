"""The model card (README.md) fishds writes into an output_dir, so that the folder is ready for
`huggingface-cli upload ORG/NAME OUTPUT_DIR`: huggingface_hub's ModelCard with ModelCardData metadata (base model,
datasets, license, library peft, tags) and a body naming the method, the FISH rule, k and the pool, the seeds,
the final metrics, the fishds version and how to load the adapter.

`fishds train` writes it on rank 0 at the end of the run (`write_run_card`), FishCallback at the end of training
(`write_model_card` with what the Trainer knows). Cost: a few kilobytes of text, once; nothing is downloaded (the
base model's license is read from its README.md when that file is already on disk).
"""

from __future__ import annotations

import json
from pathlib import Path

from . import __version__
from .files import MODEL_CARD as CARD_FILE
from .files import atomic

# built-in model names (fishds/assets.py) -> the Hub repository they were converted from, and its license
BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "all-minilm-l6-v2": ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0"),
}


def _hub_id(name: str | None) -> str | None:
    """name if it is a Hugging Face Hub id (org/name that is not a local path), else None."""
    from .hub import is_hub_name

    return name if name and is_hub_name(name) else None


def _base_license(base: str, local_folder: str | None) -> str | None:
    """The license in the base model's own card (README.md front matter), read from disk only."""
    from huggingface_hub import ModelCard

    for folder in (local_folder, base):
        card = Path(folder or "") / CARD_FILE
        if folder and card.is_file():
            try:
                lic = ModelCard.load(card).data.to_dict().get("license")
            except Exception:  # noqa: BLE001 - a card without valid metadata: no license known
                continue
            if lic:
                return str(lic)
    return None


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_model_card(
    out: Path,
    *,
    base_model: str,
    method: str,
    rule: str,
    k: int | None,
    pool: int | None,
    seeds: dict,
    metrics: dict,
    datasets: list[str] = (),
    license: str | None = None,
    settings: dict | None = None,
    trained_with: str = "fishds train",
    base_folder: str | None = None,
    auto_class: str = "AutoModelForCausalLM",
) -> Path:
    """Write out/README.md (atomically) and return its path. `base_model` is the name the user gave (a Hub id stays
    a Hub id); `datasets` the data names (only Hub ids go into the metadata); `license` None = the base model's
    license when its card is on disk, else "other" (set it before uploading)."""
    from huggingface_hub import ModelCard, ModelCardData

    hub_base, builtin_license = _hub_id(base_model), None
    if base_model in BUILTIN_MODELS:
        hub_base, builtin_license = BUILTIN_MODELS[base_model]
    license = license or builtin_license or _base_license(base_model, base_folder) or "other"
    hub_datasets = [d for d in dict.fromkeys(datasets) if _hub_id(d)]
    data = ModelCardData(
        base_model=hub_base,
        datasets=hub_datasets or None,
        library_name="peft",
        license=license,
        tags=["fishds", "fish-tuning", method, "peft"],
    )
    share = f" ({k / pool:.2%} of the pool)" if k is not None and pool else ""
    origin = f" (converted from the Hub repository `{hub_base}`)" if hub_base and hub_base != base_model else ""
    lines = [
        f"# {Path(out).resolve().name}",
        "",
        f"A {method} adapter for `{base_model}` trained with fishds {__version__} "
        f"({trained_with}): FISH-Tuning keeps a sparse mask inside the adapter, and only the selected entries "
        "were trained; every other entry kept its initial value.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base_model}`{origin} |",
        f"| method | {method} |",
        f"| FISH rule | {rule} |",
        f"| trained entries (k) | {k:,}{share} |" if k is not None else "| trained entries (k) | all (no mask) |",
        f"| pool | {pool:,} adapter entries |" if pool else "| pool | - |",
        "| seeds | " + ", ".join(f"{name} {value}" for name, value in seeds.items()) + " |",
        "| data | " + (", ".join(f"`{d}`" for d in dict.fromkeys(datasets)) or "-") + " |",
        f"| fishds | {__version__} |",
    ]
    for key, value in (settings or {}).items():
        lines.append(f"| {key} | {_fmt(value)} |")
    lines += ["", "## Final metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"] + [f"| {name} | {_fmt(v)} |" for name, v in metrics.items()]
    else:
        lines.append("No evaluation data was given.")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        f"from transformers import {auto_class}",
        "",
        f'base = {auto_class}.from_pretrained("{hub_base or base_model}")',  # a classifier: num_labels, as trained
        'model = PeftModel.from_pretrained(base, "PATH_OR_REPO_OF_THIS_FOLDER")',
        "```",
        "",
        "`fish_mask.safetensors` holds the mask (1 bit per pool entry, `fishds.fish.mask.load_masks`); "
        "`fish_report.json` (when present) the selection's statistics and the full metrics.",
    ]
    if license == "other":
        lines += ["", "The license field is `other`: set the license of the base model and the data before uploading."]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    path = Path(out) / CARD_FILE
    atomic(path, lambda tmp: tmp.write_text(str(card)))
    return path


def write_run_card(out: Path, cfg, report: dict, model_folder: str | None = None) -> Path:
    """The card of a finished `fishds train` run (rank 0): everything from the resolved config and the report."""
    from .fish import rules

    data = cfg.data
    datasets = [d.path for d in data.datasets] if data.datasets else [data.path]
    datasets = [d for d in datasets if d]
    metrics = {k: v for k, v in (report.get("eval") or {}).items() if isinstance(v, (int, float))}
    dense = cfg.fish.selection == "dense"
    steps = (("head_steps", "head-only"), ("dense_steps", "dense"))
    before = [f"{report[key]} {what} steps" for key, what in steps if report.get(key)]
    rule = rules.label(cfg.fish) + (f" after {' and '.join(before)}" if before else "")
    return write_model_card(
        out,
        base_model=cfg.model.name_or_path,
        method=cfg.peft.method,
        rule=rule,
        k=None if dense else report.get("k"),
        pool=report.get("pool_size"),
        seeds={"train.seed": cfg.train.seed, "fish.seed": cfg.fish.seed},
        metrics=metrics,
        datasets=datasets,
        settings={
            "peft.r": cfg.peft.r,
            "peft.target_modules": json.dumps(cfg.peft.target_modules),
            "quant.bits": cfg.quant.bits or "none",
            "train.lr": cfg.train.lr,
            "train.precision": cfg.train.precision,
        },
        base_folder=model_folder,
        auto_class="AutoModelForSequenceClassification" if data.format == "classification" else "AutoModelForCausalLM",
    )
