"""The causal-LM loss path (fishds/run/loss.py): chunked equals full in loss and gradients, per-example losses, the
refusals of train.loss_impl and model.attn_implementation, and the same on 2 ranks at ZeRO-2 / ZeRO-3 (loss_case.py)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_overrides, launch

from fishds.config import ConfigError, load_config
from fishds.run import loss as L


def _model(toy, tmp_path, peft_kwargs: dict, tied: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(toy["model"], dtype=torch.float32, tie_word_embeddings=tied)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **peft_kwargs))
    for n, p in model.named_parameters():  # LoRA B non-zero, so every adapter gradient is informative
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return model


def _batch(packed: bool, vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (3, 40), generator=g)
    labels = ids.clone()
    labels[:, :7] = -100  # a prompt
    labels[2, 30:] = -100  # padding
    if packed:  # two examples per row, position ids restarting, block-diagonal mask (as the Collator gives it)
        pos = torch.cat([torch.arange(25), torch.arange(15)]).repeat(3, 1)
        seg = (torch.arange(40) >= 25).long()
        mask = ((seg[:, None] == seg[None, :]) & torch.ones(40, 40, dtype=torch.bool).tril())[None, None]
        return {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": mask.expand(3, 1, 40, 40)}
    attn = torch.ones_like(ids)
    attn[2, 30:] = 0
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def _loss_and_grads(model, batch, impl: str, chunk: int | None):
    L.loss_path(model).impl, L.loss_path(model).chunk_tokens = impl, chunk
    params = [p for p in model.parameters() if p.requires_grad]
    loss = L.loss_sum(model, batch)
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize(
    "peft_kwargs,tied",
    [
        ({"target_modules": ["q_proj", "v_proj"]}, False),
        ({"target_modules": ["q_proj", "v_proj", "lm_head"]}, False),  # LoRA on the output embedding
        ({"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}, False),
        ({"target_modules": ["q_proj", "v_proj"]}, True),  # tied input and output embeddings
    ],
    ids=["plain", "lora-lm_head", "modules_to_save", "tied"],
)
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_chunked_equals_full(toy, tmp_path, peft_kwargs, tied, packed):
    model = _model(toy, tmp_path, peft_kwargs, tied)
    model.train()
    batch = _batch(packed, model.config.vocab_size)
    want, want_g = _loss_and_grads(model, batch, "full", None)
    for chunk in (7, None):  # chunks that split examples, and one chunk for everything
        got, got_g = _loss_and_grads(model, batch, "chunked", chunk)
        assert torch.allclose(got, want, rtol=1e-6, atol=0), (got, want)
        for a, b in zip(got_g, want_g):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max())), float((a - b).abs().max())
    # the model's own loss (transformers' mean over targets) agrees too
    assert torch.allclose(want / L.count_targets(batch), model(**batch).loss, rtol=1e-6)


def test_example_losses_chunked_equal_full(toy, tmp_path):
    model = _model(toy, tmp_path, {"target_modules": ["q_proj", "v_proj"]})
    batch = _batch(False, model.config.vocab_size)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    res = {}
    for impl in ("full", "chunked"):
        L.loss_path(model).impl, L.loss_path(model).chunk_tokens = impl, 5
        res[impl] = L.example_losses(model, model(**inputs, **L.forward_kwargs(model)), batch["labels"])
    assert torch.allclose(res["chunked"][0], res["full"][0], rtol=1e-6)
    assert torch.allclose(res["chunked"][1], model(**batch).loss, rtol=1e-6)
    one = {k: v[:1] for k, v in batch.items()}  # example 0 alone: its loss is the model's loss of a batch of one
    assert torch.allclose(res["chunked"][0][0], model(**one).loss, rtol=1e-6)


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_eval_sums_chunked_equal_full(toy, tmp_path, packed):
    model = _model(toy, tmp_path, {"target_modules": ["q_proj", "v_proj"]})
    model.eval()
    batch = _batch(packed, model.config.vocab_size)
    got = {}
    for impl in ("full", "chunked"):
        L.loss_path(model).impl, L.loss_path(model).chunk_tokens = impl, 6
        got[impl] = L.eval_sums(model, batch)
    assert got["chunked"][1:] == got["full"][1:] and got["full"][1] == L.count_targets(batch)
    assert got["chunked"][0] == pytest.approx(got["full"][0], rel=1e-6)


def test_chunked_memory_is_one_chunk(toy, tmp_path):
    """No (targets x vocab) tensor is kept for backward by the chunked loss: the largest saved activation (weights
    aside) is one chunk's, as full saves all of them."""
    model = _model(toy, tmp_path, {"target_modules": ["q_proj", "v_proj"]})
    batch = _batch(False, model.config.vocab_size)
    vocab, targets = model.config.vocab_size, L.count_targets(batch)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for impl, chunk in (("full", None), ("chunked", 8)):
        L.loss_path(model).impl, L.loss_path(model).chunk_tokens = impl, chunk
        saved = []

        def pack(t, saved=saved):
            if t.dim() and t.shape[-1] == vocab and t.untyped_storage().data_ptr() not in weights:
                saved.append(t.untyped_storage().nbytes() // t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            L.loss_sum(model, batch).backward()
        if impl == "full":
            assert max(saved) >= targets * vocab
        else:  # the checkpointed chunks (recomputed in backward: at most chunk x vocab), the last-position logits
            assert max(saved, default=0) <= max(chunk, 3) * vocab, max(saved)


def test_chunk_default_bounds_logit_bytes():
    assert L.LossPath().chunk(128256) == 256
    assert L.LossPath().chunk(49152) == 680
    assert L.LossPath(chunk_tokens=64).chunk(128256) == 64


def test_softcapping_and_foreign_head_transform(toy, tmp_path):
    model = _model(toy, tmp_path, {"target_modules": ["q_proj", "v_proj"]})
    batch = _batch(False, model.config.vocab_size)
    model.config.final_logit_softcapping = 0.01  # applied by fishds; the model (Llama) does not: the check refuses
    L.loss_path(model).impl = "chunked"
    with pytest.raises(ConfigError, match="train.loss_impl=chunked.*train.loss_impl=full"):
        L.loss_sum(model, batch)


@pytest.mark.parametrize("impl", ["liger", "cce"])
def test_fused_loss_refused_without_cuda_or_package(toy, tmp_path, impl):
    cfg = load_config(None, base_overrides(toy, tmp_path / "o") + [f"train.loss_impl={impl}"])
    from fishds.model import check_backends

    with pytest.raises(ConfigError, match=f"^train.loss_impl={impl} .*train.loss_impl=chunked"):
        check_backends(cfg, 2)


@pytest.mark.parametrize("impl", ["liger", "cce"])
@pytest.mark.parametrize("peft", ["peft.modules_to_save=[lm_head]", "peft.target_modules=[q_proj,lm_head]"])
def test_fused_loss_refused_with_an_adapted_lm_head(toy, tmp_path, impl, peft):
    cfg = load_config(None, base_overrides(toy, tmp_path / "o") + [f"train.loss_impl={impl}", peft])
    from fishds.model import check_backends

    with pytest.raises(ConfigError, match=f"^train.loss_impl={impl} .*lm_head is adapted.*loss_impl=chunked"):
        check_backends(cfg, 2)


@pytest.mark.parametrize("attn", ["flash_attention_2", "flash_attention_3"])
def test_flash_attention_refused_before_weights_load(toy, tmp_path, attn):
    from conftest import launch as run

    proc = run(1, base_overrides(toy, tmp_path / "o", **{"model.attn_implementation": attn}), expect_ok=False)
    assert proc.returncode != 0
    assert f"model.attn_implementation={attn}" in proc.stderr + proc.stdout
    assert "use sdpa" in proc.stderr + proc.stdout or "model.attn_implementation=sdpa" in proc.stderr + proc.stdout
    assert "Loading" not in proc.stderr  # no weights were read


def test_attn_implementation_reaches_the_model(toy, tmp_path):
    from fishds.model import load_peft_model

    cfg = load_config(None, base_overrides(toy, tmp_path / "o", **{"model.attn_implementation": "eager"}))
    model = load_peft_model(cfg, toy["model"], torch.float32)
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize(
    "ds,extra",
    [
        ("zero2.json", []),
        ("zero3.json", []),  # the frozen head gathered once per micro-batch
        ("zero3.json", ["peft.target_modules=[q_proj,v_proj,lm_head]"]),  # checkpointed chunks, hooks per call
    ],
    ids=["zero2", "zero3", "zero3-lora-lm_head"],
)
def test_chunked_equals_full_two_ranks(toy, tmp_path, ds, extra):
    out = tmp_path / "o"
    launch(2, base_overrides(toy, out) + extra, ds, script="tests/loss_case.py")
    res = json.loads((out / "loss_case.json").read_text())
    for packing in ("unpacked", "packed"):
        r = res[packing]
        assert r["loss_rel_diff"] <= 1e-6, r
        assert r["grad_rel_diff"] <= 1e-6, r
        assert r["engine_grad_rel_diff"] <= 1e-6, r  # engine.backward (DeepSpeed hooks, reduction) with chunked
        assert r["grad_max"] > 0


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_frozen_head_function_equals_autograd(softcap):
    """The frozen-head path (input gradient computed in the forward) against autograd through F.cross_entropy,
    with a per-token weighting of the losses (what the per-example Fisher pass differentiates)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(50, 16, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    t, scale = torch.randint(0, 50, (37,), generator=g), torch.rand(37, generator=g, dtype=torch.float64)
    logits = h @ w.T + b
    logits = torch.tanh(logits / softcap) * softcap if softcap else logits
    want = torch.nn.functional.cross_entropy(logits, t, reduction="none")
    (want_g,) = torch.autograd.grad((want * scale).sum(), h)
    got = L._FrozenLinearCE.apply(h, w, b, t, 8, softcap)
    (got_g,) = torch.autograd.grad((got * scale).sum(), h)
    assert torch.allclose(got.double(), want, rtol=1e-6) and torch.allclose(got_g, want_g, rtol=1e-6, atol=1e-9)


def test_configure_resolves_auto_and_refuses_a_model_without_logits_to_keep(toy, tmp_path):
    class NoKeep(torch.nn.Module):  # a causal LM whose forward cannot skip its full logits
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(4, 8)

        def forward(self, input_ids=None, attention_mask=None):
            return None

        def get_output_embeddings(self):
            return self.lm_head

    assert L.configure(NoKeep(), "auto", None, 0).impl == "full"
    with pytest.raises(ConfigError, match="train.loss_impl=chunked: NoKeep.forward takes no logits_to_keep"):
        L.configure(NoKeep(), "chunked", None, 0)
    model = _model(toy, tmp_path, {"target_modules": ["q_proj", "v_proj"]})
    assert L.configure(model, "auto", 64, 0).impl == "chunked"  # no CUDA here, so not liger
    assert L.loss_path(model).chunk_tokens == 64
