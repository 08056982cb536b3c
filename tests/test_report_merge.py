"""fishds report (the mask PNG), fishds merge (adapter folded into the base) and the fishds command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import base_overrides, launch
from safetensors import safe_open
from safetensors.torch import load_file

from fishds import cli
from fishds.fish.mask import save_masks
from fishds.merge import MergeError, merge_adapter
from fishds.report import REPORT_PNG, parse_key, write_report_png


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory) -> Path:
    """One finished single-process run (keep 0.5: the mask reaches into lora_A as well as lora_B)."""
    out = tmp_path_factory.mktemp("run") / "out"
    launch(1, base_overrides(toy, out, **{"fish.keep_ratio": 0.5}))
    return out


def assert_png(path: Path) -> None:
    from PIL import Image

    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0


def copy_run(src: Path, dst: Path, edit=None) -> Path:
    dst.mkdir(parents=True)
    for name in ("fish_report.json", "fish_mask.safetensors"):
        shutil.copy(src / name, dst / name)
    if edit is not None:
        report = json.loads((dst / "fish_report.json").read_text())
        edit(report)
        (dst / "fish_report.json").write_text(json.dumps(report))
    return dst


# ---------------------------------------------------------------- report


def test_report_png_from_a_finished_run_and_the_cli(trained, tmp_path, capsys):
    report = json.loads((trained / "fish_report.json").read_text())
    assert "log10_histogram" in report["score_stats"] and "threshold_score" in report
    path = write_report_png(trained)
    assert path == trained / REPORT_PNG
    assert_png(path)
    path.unlink()
    assert cli.main(["report", str(trained)]) == 0
    assert capsys.readouterr().out.strip() == str(trained / REPORT_PNG)
    assert_png(trained / REPORT_PNG)
    assert not [p for p in trained.iterdir() if p.name.startswith(f".{REPORT_PNG}")]  # no temporary left


def test_report_without_threshold_or_scores(trained, tmp_path):
    """Random / dense / mask-file selections have no threshold_score (and no score_stats): still a full page."""

    def no_threshold(r):
        r.pop("threshold_score")

    def random_like(r):
        for key in ("threshold_score", "score_stats", "collect_seconds", "num_samples", "granularity"):
            r.pop(key, None)
        r["selection"] = "random"

    def bare(r):  # only what a mask file run is sure to have
        for key in list(r):
            if key not in ("selection",):
                r.pop(key)
        r["selection"] = "file /elsewhere/fish_mask.safetensors"

    for name, edit in (("no_threshold", no_threshold), ("random", random_like), ("bare", bare)):
        assert_png(write_report_png(copy_run(trained, tmp_path / name, edit)))


def test_report_for_other_peft_methods_and_unparsed_keys(tmp_path):
    """Keys of ia3, loha, DoRA, bottleneck and a full head: modules found, odd kinds -> other, no layer -> other."""
    cases = {
        "base_model.model.model.layers.12.self_attn.q_proj.lora_A.weight": (12, "q_proj", "lora_A"),
        "base_model.model.model.layers.3.mlp.down_proj.lora_B.default.weight": (3, "down_proj", "lora_B"),
        "base_model.model.model.layers.0.self_attn.k_proj.ia3_l": (0, "k_proj", "other"),
        "base_model.model.model.layers.1.mlp.up_proj.hada_w1_a": (1, "up_proj", "other"),
        "base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector": (1, "v_proj", "other"),
        "model.layers.2.self_attn.o_proj.bottleneck.down.weight": (2, "o_proj", "other"),
        "base_model.model.lm_head.weight": ("other", "lm_head", "other"),
        "transformer.h.5.attn.c_attn.lora_B.weight": (5, "c_attn", "lora_B"),
    }
    for key, want in cases.items():
        info = parse_key(key)
        assert (info.layer, info.module, info.kind) == want, key
    g = torch.Generator().manual_seed(0)
    masks = {key: torch.rand((4, 6), generator=g) < 0.3 for key in cases}
    out = tmp_path / "mixed"
    out.mkdir()
    save_masks(out / "fish_mask.safetensors", masks)
    (out / "fish_report.json").write_text(json.dumps({"selection": "random", "k": 7, "pool_size": 8 * 24}))
    assert_png(write_report_png(out))


def test_report_errors_name_the_argument(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fishds: error: OUTPUT_DIR") and "no such folder" in err and "\n" not in err
    (tmp_path / "half").mkdir()
    assert cli.main(["report", str(tmp_path / "half")]) == 2
    assert "fish_mask.safetensors" in capsys.readouterr().err
    save_masks(
        tmp_path / "half" / "fish_mask.safetensors", {"a.layers.0.q.lora_A.weight": torch.ones(2, 2, dtype=torch.bool)}
    )
    assert cli.main(["report", str(tmp_path / "half")]) == 2
    assert "fish_report.json" in capsys.readouterr().err


# ---------------------------------------------------------------- merge


def probe_logits(model, probe: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits.float()


def test_merge_reproduces_the_adapter_and_refuses_a_full_folder(toy, trained, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged_dir = merge_adapter(toy["model"], trained, tmp_path / "merged")
    assert merged_dir == tmp_path / "merged" and (merged_dir / "config.json").is_file()
    assert (merged_dir / "tokenizer.json").is_file() or (merged_dir / "tokenizer_config.json").is_file()
    assert not (merged_dir / "adapter_config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    keys = []
    for f in merged_dir.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            keys += list(h.keys())
    assert keys and not [k for k in keys if "lora" in k.lower()]

    probe = load_file(str(trained / "probe_logits.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(toy["model"], dtype=torch.float32)
    base_logits = probe_logits(base, probe)
    expected = probe_logits(PeftModel.from_pretrained(base, str(trained)), probe)
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    got = probe_logits(merged, probe)
    assert not torch.allclose(expected, base_logits, atol=1e-4)  # the adapter changes the model
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, probe["logits"], atol=1e-4, rtol=1e-4)  # and it is the model that trained

    # an existing non-empty folder: refused without --overwrite, left as it was
    before = sorted(p.name for p in merged_dir.iterdir())
    (merged_dir / "keep.txt").write_text("mine")
    argv = ["merge", "--base", toy["model"], "--adapter", str(trained), "--out", str(merged_dir)]
    capsys.readouterr()  # drop the loaders' progress bars
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fishds: error: --out") and "not empty" in err and "--overwrite" in err
    assert (merged_dir / "keep.txt").read_text() == "mine"
    with pytest.raises(MergeError) as e:
        merge_adapter(toy["model"], trained, merged_dir)
    assert e.value.arg == "out_dir"
    assert cli.main(argv + ["--overwrite"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(merged_dir)
    assert sorted(p.name for p in merged_dir.iterdir()) == before  # replaced whole
    torch.testing.assert_close(
        probe_logits(AutoModelForCausalLM.from_pretrained(str(merged_dir)), probe), expected, atol=1e-5, rtol=1e-5
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_merge_and_train_errors_name_the_argument(toy, trained, tmp_path, capsys):
    def one_line_error(argv, *words, one_line=True):
        capsys.readouterr()
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fishds: error:") and ("\n" not in err or not one_line), err
        for w in words:
            assert w in err, (w, err)

    out = str(tmp_path / "m")
    one_line_error(
        ["merge", "--base", str(tmp_path / "nope"), "--adapter", str(trained), "--out", out], "--base", "no such folder"
    )
    one_line_error(
        ["merge", "--base", toy["model"], "--adapter", str(tmp_path / "nope"), "--out", out],
        "--adapter",
        "no such folder",
    )
    (tmp_path / "empty").mkdir()
    one_line_error(
        ["merge", "--base", toy["model"], "--adapter", str(tmp_path / "empty"), "--out", out],
        "--adapter",
        "adapter_config.json",
    )
    one_line_error(["merge", "--base", str(trained), "--adapter", str(trained), "--out", out], "--base", "config.json")
    one_line_error(
        ["merge", "--base", toy["model"], "--adapter", str(trained), "--out", str(trained)], "--out", "adapter folder"
    )
    assert not Path(out).exists()
    one_line_error(["train", "--config", str(tmp_path / "missing.yaml")], "missing.yaml")
    # a config with several problems lists them one per line, as launch/train.py does
    one_line_error(["train", "model.name_or_path=x"], "output_dir", one_line=False)


# ---------------------------------------------------------------- evaluate, model card, merge dtype


def test_evaluate_prints_the_runs_eval_loss(toy, trained, tmp_path, capsys):
    """`fishds evaluate` on the run's adapter and its eval file: the eval loss, perplexity and token accuracy the
    run reported (the run's formatting from fishds_config.yaml), to 1e-5."""
    report = json.loads((trained / "fish_report.json").read_text())["eval"]
    capsys.readouterr()
    assert cli.main(["evaluate", "--adapter", str(trained), "--data", toy["eval"]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    got = json.loads(lines[-1])
    assert lines[-2].startswith(f"[fishds] {toy['eval']}: loss ") and "perplexity" in lines[-2]
    assert abs(got["eval_loss"] - report["eval_loss"]) <= 1e-5 * max(1.0, abs(report["eval_loss"]))
    assert got["eval_tokens"] == report["eval_tokens"] and got["eval_token_acc"] == pytest.approx(
        report["eval_token_acc"], abs=1e-9
    )
    assert got["eval_ppl"] == pytest.approx(report["eval_ppl"], rel=1e-5)
    assert f"{got['eval_loss']:.6f}" in lines[-2]
    # the run read its eval file's first data.max_eval_examples=16 rows, as evaluate does by default; 0 = all 32
    for n, more in (("3", False), ("0", True)):
        assert cli.main(["evaluate", "--adapter", str(trained), "--data", toy["eval"], "--max_examples", n]) == 0
        tokens = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_tokens"]
        assert (tokens > got["eval_tokens"]) if more else (tokens < got["eval_tokens"])
    # a folder without the run's config is refused naming --adapter
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(trained / name, bare / name)
    assert cli.main(["evaluate", "--adapter", str(bare), "--data", toy["eval"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fishds: error: --adapter") and "fishds_config.yaml" in err


def test_model_card_and_base_name_in_the_output_dir(toy, trained):
    """output_dir/README.md is a Hub model card (ModelCard.load parses it) naming the run; the adapter names the base
    the user gave (a local folder here; a Hub id stays a Hub id: tests/test_datasets_mix.py)."""
    from huggingface_hub import ModelCard

    from fishds import __version__

    adapter_cfg = json.loads((trained / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == toy["model"]
    report = json.loads((trained / "fish_report.json").read_text())
    card = ModelCard.load(trained / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "peft" and "fishds" in meta["tags"] and "lora" in meta["tags"]
    assert meta["license"] == "other" and "base_model" not in meta  # a local folder is no Hub id
    text = card.text
    assert f"{report['k']:,}" in text and f"{report['pool_size']:,}" in text
    assert "train.seed 0, fish.seed 0" in text and f"fishds | {__version__}" in text
    assert f"| eval_loss | {report['eval']['eval_loss']:.4f} |" in text
    assert "| FISH rule | fisher" in text


def test_merge_dtype_defaults_to_the_base_models(toy, tmp_path):
    from fishds.merge import base_dtype, resolve_base

    model = tmp_path / "m"
    model.mkdir()
    for conf, want in (({"dtype": "bfloat16"}, "bfloat16"), ({"torch_dtype": "float16"}, "float16"), ({}, "float32")):
        (model / "config.json").write_text(json.dumps(conf))
        assert base_dtype(model) == want
    assert resolve_base(toy["model"]) == Path(toy["model"])
    with pytest.raises(MergeError) as e:
        resolve_base("no-such-org/no-such-model-for-fishds")
    assert e.value.arg == "base_model_path"
