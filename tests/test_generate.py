"""fishds generate: one reply with --prompt, a chat on stdin, the chat template, clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, base_overrides, launch

from fishds import cli
from fishds.generate import chat, load, prompt_ids

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} \n{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


@pytest.fixture(scope="module")
def adapter(toy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "out"
    launch(1, base_overrides(toy, out, **{"train.max_steps": 2}))
    return out


def reference_reply(toy, adapter: Path, text: str, n: int) -> str:
    """Greedy decoding of the same adapter through plain transformers + peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy["model"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy["model"]), str(adapter)).eval()
    ids = tok(text, return_tensors="pt")["input_ids"]
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_prompt_reply_matches_peft_and_chat_on_stdin(toy, adapter, capsys):
    assert cli.main(["generate", "--adapter", str(adapter), "--prompt", "good movie", "--max_new_tokens", "6"]) == 0
    got = capsys.readouterr().out.strip()
    assert got == reference_reply(toy, adapter, "good movie", 6)
    assert got, "greedy decoding of 6 new tokens printed nothing"

    proc = subprocess.run(
        [sys.executable, "-m", "fishds.cli", "generate", "--adapter", str(adapter), "--max_new_tokens", "6"],
        input="good movie\nbad plot\n\nnever read\n",
        text=True,
        capture_output=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines == [got, reference_reply(toy, adapter, "bad plot", 6)]  # the empty line ended the chat


def test_chat_template_renders_the_conversation(toy, adapter, tmp_path):
    from transformers import AutoTokenizer

    with_template = tmp_path / "adapter"
    shutil.copytree(adapter, with_template)
    tok = AutoTokenizer.from_pretrained(toy["model"])
    tok.chat_template = TEMPLATE
    tok.save_pretrained(with_template)  # the adapter folder's tokenizer wins over the base's
    model, tokenizer = load(with_template)
    assert tokenizer.chat_template == TEMPLATE
    seen = []
    messages = chat(model, tokenizer, ["good movie", "bad plot"], seen.append, max_new_tokens=3)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages[1::2]] == seen
    rendered = tokenizer.apply_chat_template(messages[:3], add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("user : good movie \nassistant : ") and rendered.endswith(
        "user : bad plot \nassistant : "
    )
    ids = prompt_ids(tokenizer, messages[:3])
    assert ids[0].tolist() == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_errors_name_the_flag(adapter, tmp_path, capsys):
    assert cli.main(["generate", "--adapter", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "--adapter" in capsys.readouterr().err
    moved = tmp_path / "moved"
    shutil.copytree(adapter, moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone" / "model")
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    assert cli.main(["generate", "--adapter", str(moved), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "--base" in err and "pass --base" in err
    cfg.update(task_type="SEQ_CLS")
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    assert cli.main(["generate", "--adapter", str(moved), "--base", str(adapter), "--prompt", "x"]) == 2
    assert "sequence-classification" in capsys.readouterr().err
    assert cli.main(["generate", "--adapter", str(adapter), "--max_new_tokens", "0"]) == 2


def test_load_uses_the_base_models_dtype_and_the_gpu_when_present(toy, adapter, tmp_path):
    """No --dtype: the dtype the base's config.json names (bfloat16 here); on the GPU when one is present."""
    base = tmp_path / "bf16-base"
    shutil.copytree(toy["model"], base)
    conf = json.loads((base / "config.json").read_text())
    conf.pop("torch_dtype", None)
    (base / "config.json").write_text(json.dumps({**conf, "dtype": "bfloat16"}))
    model, _ = load(adapter, str(base))
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {want}
    model, _ = load(adapter, str(base), "float32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
