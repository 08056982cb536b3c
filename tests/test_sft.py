"""Supervised fine-tuning as practitioners expect it: token-level loss averaging across accumulation and
ranks, packing with per-example attention isolation, epochs and schedules, truncation counts, chat options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import base_overrides, launch
from safetensors.torch import load_file


def _text_file(toy: dict, path: Path) -> Path:
    """The toy reviews as text rows: 3..10 words plus </s>, so examples differ in their number of target tokens."""
    rows = [json.loads(line) for line in Path(toy["train"]).read_text().splitlines()]
    path.write_text("".join(json.dumps({"text": r["input"]}) + "\n" for r in rows))
    return path


def _rel_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in b)


def test_token_level_loss_same_adapter_for_any_accumulation_and_ranks(toy, tmp_path):
    """The step's loss is the mean over all its target tokens: micro-batch 1 x accumulation 4, 4 x 1 on one rank and
    2 x 1, 1 x 2 on two ranks train the same adapter (SGD, no clipping: the gradient's scale shows)."""
    data = _text_file(toy, tmp_path / "text.jsonl")
    runs = {"1x4": (1, 1, 4), "4x1": (1, 4, 1), "2ranks_2x1": (2, 2, 1), "2ranks_1x2": (2, 1, 2)}
    adapters, losses = {}, {}
    for name, (ranks, mbs, ga) in runs.items():
        out = tmp_path / name
        launch(
            ranks,
            base_overrides(
                toy,
                out,
                **{
                    "data.path": data,
                    "data.format": "text",
                    "data.eval_path": data,
                    "fish.selection": "dense",
                    "fish.keep_ratio": "null",
                    "train.optimizer": "sgd",
                    "train.lr": 0.5,
                    "train.grad_clip": 0,
                    "train.micro_batch_size": mbs,
                    "train.grad_accum": ga,
                    "train.max_steps": 3,
                },
            ),
        )
        adapters[name] = load_file(str(out / "adapter_model.safetensors"))
        losses[name] = [
            json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"phase"' in line
        ]
    init = load_file(str(tmp_path / "4x1" / "init_adapter_model.safetensors"))
    ref = adapters["4x1"]
    assert _rel_diff(init, ref) > 1e-3, "the adapter did not move; the comparison would prove nothing"
    for name in runs:
        assert _rel_diff(adapters[name], ref) < 1e-4, name
        assert losses[name] == pytest.approx(losses["4x1"], rel=1e-5), name  # the logged loss: token-weighted mean


def test_loss_sum_matches_the_models_mean_loss():
    """loss_sum / targets is the model's own (transformers) causal-LM mean loss on one micro-batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fishds.run.loss import count_targets, loss_sum

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    ids = torch.randint(0, 50, (3, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, 6:] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    assert count_targets(batch) == 3 * 8 - 3 - 3
    with torch.no_grad():
        assert float(loss_sum(model, batch) / count_targets(batch)) == pytest.approx(
            float(model(**batch).loss), rel=1e-6
        )


def _per_example_losses(model, batch: dict, seq_lens: list[list[int]]) -> list[float]:
    """Mean token loss of each example inside the packed rows (targets: shifted labels != -100)."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits.float()
    tok = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100, reduction="none"
    )
    valid = batch["labels"][:, 1:] != -100
    out = []
    for i, lens in enumerate(seq_lens):
        start = 0
        for n in lens:
            # targets of the example: label positions start+1 .. start+n-1, i.e. shifted positions start .. start+n-2
            sl = slice(start, start + n - 1)
            out.append(float(tok[i, sl][valid[i, sl]].sum() / valid[i, sl].sum()))
            start += n
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager", "position_ids_only"])
def test_packed_example_loss_equals_its_loss_alone(toy, attn):
    """Packing never cuts an example, and isolates it: each example's loss inside a packed batch equals its loss
    alone (fp32). sdpa gets a boolean 4-D block-diagonal mask, eager an additive one; position_ids_only is what a
    varlen (flash-attention) model gets, which transformers also honours on sdpa by detecting the restarts."""
    from transformers import AutoModelForCausalLM

    from fishds.run.data import Collator
    from fishds.run.formats import pack
    from fishds.run.loss import count_targets, loss_sum

    model = AutoModelForCausalLM.from_pretrained(
        toy["model"], attn_implementation="eager" if attn == "eager" else "sdpa", dtype=torch.float32
    ).eval()
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in [5, 9, 3, 12, 7, 4, 11, 6, 8, 2, 10]:
        ids = torch.randint(4, 40, (n,), generator=g).tolist()
        labels = [-100] * (n // 3) + ids[n // 3 :]  # a prompt without loss, then the answer
        examples.append({"input_ids": ids, "labels": labels})
    blocks = pack(examples, 24)
    assert [n for b in blocks for n in b["seq_lens"]] == [len(e["input_ids"]) for e in examples]  # whole, in order
    assert all(len(b["input_ids"]) <= 24 for b in blocks) and len(blocks) < len(examples)
    collate = Collator(0, "flash_attention_2" if attn == "position_ids_only" else attn, torch.float32)
    batch = collate(blocks)
    assert batch["position_ids"][0, :6].tolist() == [0, 1, 2, 3, 4, 0]  # restart per example
    assert ("attention_mask" in batch) == (attn != "position_ids_only")
    packed = _per_example_losses(model, batch, [b["seq_lens"] for b in blocks])
    alone_collate = Collator(0)
    with torch.no_grad():
        alone = [float(loss_sum(model, b) / count_targets(b)) for b in (alone_collate([e]) for e in examples)]
    assert packed == pytest.approx(alone, rel=1e-5, abs=1e-6)
    # and without isolation (plain causal attention over the block) the losses differ: the test can tell
    leaky = {
        "input_ids": batch["input_ids"],
        "labels": batch["labels"],
        "attention_mask": (batch["input_ids"] != 0).long(),
    }
    assert _per_example_losses(model, leaky, [b["seq_lens"] for b in blocks]) != pytest.approx(alone, rel=1e-3)


def test_fisher_scores_unpacked_examples(toy, tmp_path):
    """The Fisher pass draws its N examples from the unpacked training set: with and without data.packing the
    scores are the same bits (scored at initialisation, before any step)."""
    scores = {}
    for packing in ("false", "true"):
        out = tmp_path / f"packing_{packing}"
        launch(
            1,
            base_overrides(
                toy,
                out,
                **{
                    "data.packing": packing,
                    "fish.save_scores": "true",
                    "train.max_steps": 1,
                    "data.max_eval_examples": 4,
                },
            ),
        )
        scores[packing] = load_file(str(out / "fisher_scores.safetensors"))
        assert json.loads((out / "fish_selection.json").read_text())["num_samples"] == 16
    assert scores["false"].keys() == scores["true"].keys()
    assert all(torch.equal(scores["false"][k], scores["true"][k]) for k in scores["false"])
    assert any(float(v.sum()) > 0 for v in scores["true"].values())


def _cfg(tmp_path, **over):
    from fishds.config import load_config

    o = {"model.name_or_path": "m", "data.path": "d.jsonl", "output_dir": str(tmp_path), **over}
    return load_config(None, [f"{k}={v}" for k, v in o.items()])


def test_dense_steps_and_the_deprecated_warmup_steps_alias(tmp_path):
    from fishds.config import ConfigError

    with pytest.warns(FutureWarning, match="fish.warmup_steps is deprecated: it is now fish.dense_steps"):
        assert _cfg(tmp_path, **{"fish.warmup_steps": 3}).fish.dense_steps == 3
    assert _cfg(tmp_path, **{"fish.dense_steps": 2}).fish.dense_steps == 2
    with pytest.raises(ConfigError, match="set only fish.dense_steps"):
        _cfg(tmp_path, **{"fish.warmup_steps": 3, "fish.dense_steps": 3})


def test_run_length_from_max_steps_or_epochs(tmp_path):
    from fishds.config import ConfigError
    from fishds.run.schedule import DEFAULT_STEPS, epoch_of, total_steps

    # 100 blocks, 4 per micro-batch x 2 ranks -> 12 micro-batches per rank per epoch, / accumulation 3 -> 4 steps
    over = {"train.micro_batch_size": 4, "train.grad_accum": 3}
    assert total_steps(_cfg(tmp_path, **over, **{"train.epochs": 2}), 100, 2) == 8
    assert total_steps(_cfg(tmp_path, **over, **{"train.epochs": 0.3}), 100, 2) == 2  # ceil(1.2)
    assert total_steps(_cfg(tmp_path, **over, **{"train.epochs": 2, "train.max_steps": 5}), 100, 2) == 5
    assert total_steps(_cfg(tmp_path, **over), 100, 2) == DEFAULT_STEPS
    assert epoch_of(18, 100, 4, 2) == 1.5
    with pytest.raises(ConfigError, match=r"fish.dense_steps=8 leaves no masked step: train.epochs=2 \(8 steps"):
        total_steps(_cfg(tmp_path, **over, **{"train.epochs": 2, "fish.dense_steps": 8}), 100, 2)


def test_scheduler_names_are_transformers_and_bad_settings_are_named(tmp_path):
    from transformers.trainer_utils import SchedulerType

    from fishds.config import SCHEDULERS, ConfigError
    from fishds.run.schedule import check

    assert set(SCHEDULERS) <= {s.value for s in SchedulerType}
    with pytest.raises(ConfigError, match="train.lr_warmup_steps and train.lr_warmup_ratio are both set"):
        _cfg(tmp_path, **{"train.lr_warmup_steps": 2, "train.lr_warmup_ratio": 0.1})
    with pytest.raises(ConfigError, match="use train.scheduler=constant_with_warmup"):
        _cfg(tmp_path, **{"train.scheduler": "constant", "train.lr_warmup_steps": 2})
    with pytest.raises(ConfigError, match="unexpected keyword|train.scheduler"):
        _cfg(tmp_path, **{"train.scheduler": "plateau"})
    with pytest.raises(ConfigError, match=r"train.scheduler='cosine_with_min_lr' with train.scheduler_kwargs=\{\}"):
        check(_cfg(tmp_path, **{"train.scheduler": "cosine_with_min_lr"}))
    check(_cfg(tmp_path, **{"train.scheduler": "cosine_with_min_lr", "train.scheduler_kwargs": "{min_lr_rate: 0.1}"}))


def test_epochs_dense_steps_in_the_budget_and_transformers_schedule(toy, tmp_path):
    """train.epochs=1.5 over 32 examples (4 per micro-batch, accumulation 2: 4 steps an epoch) is 6 steps, of which
    fish.dense_steps=2 are dense; every step records its epoch; the LR follows transformers.get_scheduler's cosine
    with a warm-up ratio."""
    from transformers import get_scheduler

    out = tmp_path / "out"
    launch(
        1,
        base_overrides(
            toy,
            out,
            **{
                "data.max_examples": 32,
                "train.max_steps": "null",
                "train.epochs": 1.5,
                "train.grad_accum": 2,
                "fish.dense_steps": 2,
                "train.scheduler": "cosine",
                "train.lr_warmup_ratio": 0.3,
                "data.max_eval_examples": 4,
            },
        ),
    )
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"phase"' in line]
    assert [r["phase"] for r in steps] == ["dense"] * 2 + ["train"] * 4
    assert [r["epoch"] for r in steps] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=6)  # ceil(0.3 x 6) = 2
    expected = []
    for _ in range(6):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [r["lr"] for r in steps] == pytest.approx(expected, rel=1e-9)
    assert json.loads((out / "fish_report.json").read_text())["dense_steps"] == 2


def _expected_counts(toy, n: int, rows: list[dict]) -> dict:
    """Truncated / dropped counts computed here from the tokenizer, independently of fishds.run.formats."""
    from fishds.model import load_tokenizer
    from fishds.run.formats import _alpaca_prompt

    tok = load_tokenizer(toy["model"])
    out = {"rows": len(rows), "truncated": 0, "dropped": 0}
    for r in rows:
        prompt = len(tok(_alpaca_prompt(tok, r), add_special_tokens=False)["input_ids"])
        answer = len(tok(r["output"] + tok.eos_token, add_special_tokens=False)["input_ids"])
        if prompt >= n:
            out["dropped"] += 1
        elif prompt + answer > n:
            out["truncated"] += 1
    return out


def _prompt_lengths(toy) -> tuple[list[dict], list[int]]:
    from fishds.model import load_tokenizer
    from fishds.run.formats import _alpaca_prompt

    tok = load_tokenizer(toy["model"])
    rows = [json.loads(line) for line in Path(toy["train"]).read_text().splitlines()]
    return rows, sorted(len(tok(_alpaca_prompt(tok, r), add_special_tokens=False)["input_ids"]) for r in rows)


def test_truncated_and_dropped_counts(toy, tmp_path):
    """load_examples counts the examples data.max_length cuts and those it leaves without a target token (also
    from its cache), and refuses a file where every example loses all its target tokens."""
    from fishds.config import ConfigError, DataSection
    from fishds.model import load_tokenizer
    from fishds.run.data import load_examples

    rows, lengths = _prompt_lengths(toy)
    n = lengths[len(lengths) // 2] + 1  # about half the prompts fill the limit; some keep part of the answer
    expected = _expected_counts(toy, n, rows)
    assert expected["truncated"] > 0 and expected["dropped"] > 0
    tok = load_tokenizer(toy["model"])
    data = DataSection(path=toy["train"], max_length=n)
    for _ in range(2):  # tokenized, then read from the cache
        counts = {}
        examples = load_examples(tok, toy["train"], "data.path", data, None, cache=tmp_path / "c", counts=counts)
        assert counts == expected and len(examples) == len(rows) - expected["dropped"]
        assert all("truncated" not in e for e in examples)
    with pytest.raises(
        ConfigError,
        match=rf"every example \(all {len(rows)}\) loses all its target tokens to "
        rf"data.max_length={lengths[0]}",
    ):
        load_examples(
            tok,
            toy["train"],
            "data.path",
            DataSection(path=toy["train"], max_length=lengths[0]),
            None,
            cache=tmp_path / "c",
        )


def test_truncated_and_dropped_in_the_report_and_printed(toy, tmp_path):
    rows, lengths = _prompt_lengths(toy)
    n = lengths[len(lengths) // 4] + 1
    expected = _expected_counts(toy, n, rows)
    out = tmp_path / "out"
    proc = launch(
        2, base_overrides(toy, out, **{"data.max_length": n, "train.max_steps": 1, "data.max_eval_examples": 8})
    )
    report = json.loads((out / "fish_report.json").read_text())
    assert report["truncated_examples"]["data.path"] == expected["truncated"] > 0
    assert report["dropped_examples"]["data.path"] == expected["dropped"] > 0
    assert report["data_rows"]["data.path"] == len(rows)
    assert set(report["truncated_examples"]) == {"data.path", "data.eval_path"}
    assert (
        f"[fishds] data.path: {len(rows):,} rows, {expected['truncated']:,} truncated to data.max_length={n}, "
        f"{expected['dropped']:,} dropped (no target token left)"
    ) in proc.stdout


CHAT = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)
TURNS = [
    ("user", "label the review good movie"),
    ("assistant", "fresh"),
    ("user", "label the review awful plot"),
    ("assistant", "rotten"),
]


def _learned(tok, e) -> list[str]:
    return tok.decode([i for i, lab in zip(e["input_ids"], e["labels"]) if lab != -100]).split()


def test_sharegpt_rows_role_map_and_train_turns(toy, tmp_path):
    from fishds.config import DataSection
    from fishds.model import load_tokenizer
    from fishds.run.formats import check_row, tokenize_row

    tok = load_tokenizer(toy["model"])
    tok.chat_template = CHAT
    plain = {"messages": [{"role": r, "content": c} for r, c in TURNS]}
    gpt = {"conversations": [{"from": {"user": "human", "assistant": "gpt"}[r], "value": c} for r, c in TURNS]}
    share = dict(messages_field="conversations", role_field="from", content_field="value")
    d_plain = DataSection(path="x", format="chat", max_length=128)
    d_share = DataSection(path="x", format="chat", max_length=128, **share)
    assert check_row(gpt, d_share) is None and tokenize_row(tok, gpt, d_share) == tokenize_row(tok, plain, d_plain)
    assert "lacks 'conversations' as a list of {'from': str, 'value': str}" in check_row(plain, d_share)
    no_map = DataSection(path="x", format="chat", role_map={}, **share)
    assert "has no assistant turn" in check_row(gpt, no_map) and "data.role_map={}" in check_row(gpt, no_map)
    e = tokenize_row(tok, gpt, d_share)
    assert _learned(tok, e) == ["fresh", "</s>", "rotten", "</s>"]
    last = tokenize_row(tok, gpt, DataSection(path="x", format="chat", max_length=128, train_turns="last", **share))
    assert _learned(tok, last) == ["rotten", "</s>"] and last["input_ids"] == e["input_ids"]
    every = tokenize_row(tok, gpt, DataSection(path="x", format="chat", max_length=128, train_turns="all", **share))
    assert every["labels"][1:] == every["input_ids"][1:] and every["input_ids"] == e["input_ids"]


def test_chat_template_override_string_or_file_and_prefix_check(toy, tmp_path):
    from fishds.config import ConfigError, DataSection
    from fishds.model import load_tokenizer
    from fishds.run.data import load_examples

    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": [{"role": r, "content": c} for r, c in TURNS]}) + "\n")
    (tmp_path / "t.jinja").write_text(CHAT)

    def load(template, tok=None):
        tok = tok or load_tokenizer(toy["model"])  # has no chat template of its own
        data = DataSection(path=str(f), format="chat", chat_template=template)
        return load_examples(tok, str(f), "data.path", data, None, cache=tmp_path / "c")

    got = []
    for template in (CHAT, str(tmp_path / "t.jinja")):
        tok = load_tokenizer(toy["model"])
        got.append(load(template, tok))
        assert _learned(tok, got[-1][0]) == ["fresh", "</s>", "rotten", "</s>"]
    assert got[0] == got[1]
    for bad, msg in (
        ("no_such_template.jinja", "is neither a file nor a Jinja template"),
        ("{% for m in messages %}", "not a valid Jinja template"),
    ):
        with pytest.raises(ConfigError, match=msg):
            load(bad)
    # a template that rewrites earlier turns (numbers them from the end) cannot locate the assistant tokens
    rewriting = (
        "{% for m in messages %}<s> {{ loop.revindex }} {{ m['role'] }} : {{ m['content'] }} </s> "
        "{% endfor %}{% if add_generation_prompt %}<s> assistant : {% endif %}"
    )
    with pytest.raises(
        ConfigError,
        match=r"the render of turns 1..1 with the generation prompt of 4 is not a "
        r"prefix of the whole conversation's render",
    ):
        load(rewriting)


def test_sharegpt_run_with_template_file_learns_the_last_turn(toy, tmp_path):
    """A whole run on ShareGPT rows (conversations / from / value, human / gpt) with data.chat_template from a file
    (the toy tokenizer has none) and data.train_turns=last: eval counts 2 learned tokens per conversation."""
    rows = [json.loads(line) for line in Path(toy["train"]).read_text().splitlines()]
    convs = []
    for a, b in zip(rows[0::2], rows[1::2]):
        turns = [
            ("human", f"label the review {a['input']}"),
            ("gpt", a["output"]),
            ("human", f"label the review {b['input']}"),
            ("gpt", b["output"]),
        ]
        convs.append({"conversations": [{"from": r, "value": v} for r, v in turns]})
    data = tmp_path / "sharegpt.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in convs))
    (tmp_path / "t.jinja").write_text(CHAT)
    out = tmp_path / "out"
    launch(
        1,
        base_overrides(
            toy,
            out,
            **{
                "data.path": data,
                "data.eval_path": data,
                "data.format": "chat",
                "data.messages_field": "conversations",
                "data.role_field": "from",
                "data.content_field": "value",
                "data.chat_template": tmp_path / "t.jinja",
                "data.train_turns": "last",
                "data.max_length": 96,
                "data.max_eval_examples": 8,
                "train.max_steps": 2,
            },
        ),
    )
    report = json.loads((out / "fish_report.json").read_text())
    assert report["eval"]["eval_tokens"] == 8 * 2 and report["dropped_examples"]["data.path"] == 0


def test_tokenized_examples_stay_in_the_memory_mapped_arrow_file(toy, tmp_path):
    """load_examples gives a view of the arrow cache file (memory-mapped, not loaded into Python lists): items are
    read on access, subsets and mixes are index views, and they equal the lists the rows make."""
    import datasets

    from fishds.config import DataSection
    from fishds.model import load_tokenizer
    from fishds.run.data import load_examples
    from fishds.run.examples import ArrowExamples, Picked, subset
    from fishds.run.mixing import mix

    tok = load_tokenizer(toy["model"])
    data = DataSection(path=toy["train"], max_length=64)
    ex = load_examples(tok, toy["train"], "data.path", data, None, cache=tmp_path / "c")
    assert isinstance(ex, ArrowExamples) and len(ex) == 256
    files = [f["filename"] for f in ex.dataset.cache_files]
    assert len(files) == 1 and files[0].startswith(str(tmp_path / "c"))
    assert not isinstance(ex.dataset._data, datasets.table.InMemoryTable)  # memory-mapped, not read into memory
    rows = datasets.Dataset.from_file(files[0]).to_list()
    as_lists = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows if r["input_ids"]]
    assert ex == as_lists and ex[-1] == as_lists[-1] and ex[3:7] == as_lists[3:7] and ex[::50] == as_lists[::50]
    part = subset(ex, [5, 2, 9])
    assert isinstance(part, ArrowExamples) and part == [as_lists[5], as_lists[2], as_lists[9]]
    assert part.dataset is ex.dataset  # a view: no token copied
    m = mix([ex, part], [1.0, 2.0])
    assert isinstance(m, Picked) and len(m) == 256 + 6
    assert sorted(map(str, m)) == sorted(map(str, as_lists + 2 * list(part)))
    with pytest.raises(IndexError):
        ex[256]
