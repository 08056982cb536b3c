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
