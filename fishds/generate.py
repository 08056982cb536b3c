"""`fishds generate`: a quick look at a trained adapter, with the tokenizer's chat template.

    fishds generate --adapter OUTPUT_DIR --prompt "Is this review fresh or rotten? ..."   # one reply
    fishds generate --adapter OUTPUT_DIR                                                   # chat on stdin

The base model is the adapter's `base_model_name_or_path` (adapter_config.json) unless --base names another
folder; the tokenizer is the adapter folder's when it has one, else the base's. A prompt is rendered with the
tokenizer's chat template (add_generation_prompt) when it has one, else fed as plain text. Without --prompt,
each line read from stdin is a user turn; the conversation is kept, and an empty line, `exit` or end of input
ends it. Decoding is greedy unless --temperature > 0. The model runs on the GPU when one is present, in the base
model's dtype (config.json) unless --dtype names another; a Hub id as base is read through the local HF cache.
For benchmark scores use lm-eval-harness (docs/training.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .merge import ADAPTER_CONFIG, TOKENIZER_FILES, MergeError, base_dtype, resolve_base


def resolve_inputs(adapter_dir, base: str | None = None) -> tuple[Path, str]:
    """(adapter folder, base model path or hub name); MergeError naming the argument before any weights load."""
    adapter = Path(adapter_dir)
    if not adapter.is_dir():
        raise MergeError("adapter_dir", adapter, "no such folder")
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise MergeError(
            "adapter_dir",
            adapter,
            f"no {ADAPTER_CONFIG} (not a PEFT adapter folder; a fishds "
            "bottleneck adapter is loaded with fishds.bottleneck.load_bottleneck)",
        )
    cfg = json.loads((adapter / ADAPTER_CONFIG).read_text())
    if cfg.get("task_type") == "SEQ_CLS":
        raise MergeError(
            "adapter_dir",
            adapter,
            "is a sequence-classification adapter: it predicts labels, it does "
            "not generate text (evaluate it with data.test_path)",
        )
    base = base or cfg.get("base_model_name_or_path")
    if not base:
        raise MergeError("base_model_path", base, f"{ADAPTER_CONFIG} names no base model; pass --base")
    if not Path(base).is_dir() and (base.startswith((".", "/", "~")) or base.count("/") != 1):
        raise MergeError(
            "base_model_path",
            base,
            "no such folder (the base the adapter was trained on moved?); pass --base with the model folder",
        )
    return adapter, str(resolve_base(base))  # a Hub id: its snapshot folder


def load(adapter_dir, base: str | None = None, dtype: str | None = None):
    """(PeftModel in eval mode on the GPU when there is one, tokenizer) for an adapter folder; dtype None = the
    base model's."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, base = resolve_inputs(adapter_dir, base)
    tok_src = adapter if any((adapter / f).is_file() for f in TOKENIZER_FILES) else base
    tokenizer = AutoTokenizer.from_pretrained(str(tok_src), trust_remote_code=False)
    dtype = getattr(torch, dtype or base_dtype(Path(base)))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, trust_remote_code=False)
    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False, autocast_adapter_dtype=False)
    return model.to(dtype).to("cuda" if torch.cuda.is_available() else "cpu").eval(), tokenizer


def prompt_ids(tokenizer, messages: list[dict]):
    """Token ids (1 x T) of a conversation: the chat template with a generation prompt, else the last user text."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(messages[-1]["content"], return_tensors="pt")["input_ids"]
    return ids


def reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0) -> str:
    """The model's next turn (decoded new tokens only)."""
    import torch

    ids = prompt_ids(tokenizer, messages).to(model.device)
    sample = temperature > 0
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def chat(model, tokenizer, lines, write, max_new_tokens: int = 128, temperature: float = 0.0) -> list[dict]:
    """A conversation over `lines` (user turns); `write` receives each reply. Returns the messages."""
    messages: list[dict] = []
    for line in lines:
        text = line.strip()
        if not text or text == "exit":
            break
        messages.append({"role": "user", "content": text})
        answer = reply(model, tokenizer, messages, max_new_tokens, temperature)
        messages.append({"role": "assistant", "content": answer})
        write(answer)
    return messages


def main(args) -> int:
    """The CLI entry (fishds/cli.py parses the flags)."""
    model, tokenizer = load(args.adapter, args.base, args.dtype)
    if args.prompt is not None:
        print(
            reply(model, tokenizer, [{"role": "user", "content": args.prompt}], args.max_new_tokens, args.temperature),
            flush=True,
        )
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print("[fishds] chat with the adapter: one line per turn; an empty line or `exit` ends", file=sys.stderr)

    def lines():
        while True:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                return
            yield line

    chat(model, tokenizer, lines(), lambda text: print(text, flush=True), args.max_new_tokens, args.temperature)
    return 0
