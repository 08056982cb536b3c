"""The model card fishds writes into an output_dir (fishds/card.py): Hub metadata only where it is true (a Hub id as
base_model and datasets, the built-in models' Hub origin and license, `other` otherwise), parseable by
huggingface_hub. The cards of real runs are checked in tests/test_report_merge.py and tests/test_datasets_mix.py."""

from __future__ import annotations

from huggingface_hub import ModelCard

from fishds.card import write_model_card


def _card(tmp_path, **kw):
    args = dict(method="lora", rule="fisher", k=10, pool=100, seeds={"train.seed": 3}, metrics={"eval_loss": 0.5})
    path = write_model_card(tmp_path, **{**args, **kw})
    card = ModelCard.load(path)
    return card.data.to_dict(), card.text


def test_builtin_base_names_its_hub_origin_and_license(tmp_path):
    meta, text = _card(
        tmp_path, base_model="smollm2-135m-instruct", datasets=["rotten_tomatoes", "org/reviews"], auto_class="AutoX"
    )
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["org/reviews"]  # a built-in task name is no Hub dataset
    assert "| trained entries (k) | 10 (10.00% of the pool) |" in text and "| seeds | train.seed 3 |" in text
    assert 'AutoX.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")' in text
    assert "| eval_loss | 0.5000 |" in text


def test_local_base_reads_its_license_from_its_own_card(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# a model\n")
    out = tmp_path / "out"
    out.mkdir()
    meta, text = _card(out, base_model=str(base), k=None, metrics={})
    assert meta["license"] == "mit" and "base_model" not in meta
    assert "all (no mask)" in text and "No evaluation data was given." in text
    meta, text = _card(out, base_model=str(tmp_path / "nowhere"))
    assert meta["license"] == "other" and "set the license" in text
