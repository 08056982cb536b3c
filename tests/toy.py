"""A tiny Llama with a word-level tokenizer and small alpaca data, made locally in seconds for tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "good great fine bad awful poor movie film plot actor scene story music slow fast funny dull "
    "bright dark long short warm cold loud quiet sharp"
).split()


def write_alpaca(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 10))]
        pos = sum(w in ("good", "great", "fine", "funny", "bright", "warm") for w in words)
        neg = sum(w in ("bad", "awful", "poor", "dull", "slow", "cold") for w in words)
        rows.append(
            {"instruction": "label the review", "input": " ".join(words), "output": "fresh" if pos >= neg else "rotten"}
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_classification(path: Path, n: int, seed: int = 0) -> Path:
    """{"text", "label"} rows, labels the strings fresh / rotten (jsonl)."""
    rows = [json.loads(line) for line in write_alpaca(path, n, seed).read_text().splitlines()]
    path.write_text("".join(json.dumps({"text": r["input"], "label": r["output"]}) + "\n" for r in rows))
    return path


def make_tiny_bert(folder: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised BERT encoder (seeded) with a WordPiece tokenizer over the toy words."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    BertTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    ).save_pretrained(folder)
    cfg = BertConfig(
        vocab_size=5 + len(WORDS),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    BertModel(cfg).save_pretrained(folder)
    return folder


def make_tiny_llama(folder: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Save a randomly initialised Llama (seeded) and a word-level tokenizer into `folder`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"])}
    extra = (
        WORDS
        + "label the review fresh rotten below is an instruction that describes a task write response "
        "appropriately completes request ### instruction input : \n".split(" ")
        + ["#", ":", ".", "Instruction", "Input", "Response", "Below", "A"]
    )
    for w in extra:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    import sys

    root = Path(sys.argv[1])
    make_tiny_llama(root / "model")
    write_alpaca(root / "train.jsonl", 256, seed=0)
    write_alpaca(root / "eval.jsonl", 32, seed=1)
    print(root)
