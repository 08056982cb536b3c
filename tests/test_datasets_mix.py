"""Several datasets in one run (data.datasets, mixed by weight) and Hugging Face Hub names resolved offline
from a local HF cache folder the test builds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, base_overrides, launch
from test_bad_input import broken_weights_model, launch_train  # noqa: F401 - fixture reused
from test_bad_input_more import _fails, _isolated_process_group  # noqa: F401 - fixtures reused


def _sharegpt(toy: dict, path: Path, n: int) -> Path:
    rows = [json.loads(line) for line in Path(toy["train"]).read_text().splitlines()][:n]
    path.write_text(
        "".join(
            json.dumps(
                {
                    "conversations": [
                        {"from": "human", "value": f"label the review {r['input']}"},
                        {"from": "gpt", "value": r["output"]},
                    ]
                }
            )
            + "\n"
            for r in rows
        )
    )
    return path


CHAT = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)


def _mix_overrides(toy, tmp_path, chat: Path, **extra) -> dict:
    entries = [
        {"path": toy["train"], "weight": 2, "max_examples": 40},
        {
            "path": str(chat),
            "weight": 0.5,
            "format": "chat",
            "messages_field": "conversations",
            "role_field": "from",
            "content_field": "value",
            "chat_template": CHAT,
        },
    ]
    return {"data.path": "null", "data.datasets": json.dumps(entries), **extra}


def test_mix_weights_are_copies_and_seeded():
    from fishds.run.mixing import mix

    a = [{"i": i} for i in range(10)]
    b = [{"j": j} for j in range(6)]
    m = mix([a, b], [2.0, 0.5])
    assert len(m) == 2 * 10 + 3 and m == mix([a, b], [2.0, 0.5])  # fixed seed: the same mix every time
    assert sum(e == {"i": 3} for e in m) == 2 and len({e["j"] for e in m if "j" in e}) == 3
    assert m != a * 2 + [e for e in m if "j" in e]  # shuffled


def test_datasets_run_mixes_formats_each_with_its_keys(toy, tmp_path):
    chat = _sharegpt(toy, tmp_path / "chat.jsonl", 30)
    out = tmp_path / "out"
    proc = launch(
        1,
        base_overrides(
            toy, out, **_mix_overrides(toy, tmp_path, chat, **{"train.max_steps": 2, "data.max_eval_examples": 8})
        ),
    )
    report = json.loads((out / "fish_report.json").read_text())
    assert report["data_rows"] == {"data.datasets[0].path": 40, "data.datasets[1].path": 30, "data.eval_path": 8}
    assert "[fishds] data.datasets[1].path: 30 rows" in proc.stdout
    assert "[fishds] training mix: 80 of data.datasets[0].path, 15 of data.datasets[1].path" in proc.stdout


def test_datasets_rows_checked_before_weights(toy, tmp_path, capsys, broken_weights_model):  # noqa: F811
    chat = _sharegpt(toy, tmp_path / "chat.jsonl", 5)
    lines = chat.read_text().splitlines()
    lines[3] = json.dumps({"conversations": [{"role": "user", "content": "x"}]})
    chat.write_text("\n".join(lines) + "\n")
    ov = base_overrides(
        toy, tmp_path / "out", **{"model.name_or_path": broken_weights_model, **_mix_overrides(toy, tmp_path, chat)}
    )
    _fails(
        ov,
        capsys,
        f"data.datasets[1].path={str(chat)!r}: row 4 lacks 'conversations' as a list of {{'from': str, 'value': str}}",
    )
    _fails(
        base_overrides(toy, tmp_path / "out", **{"data.datasets": json.dumps([{"path": toy["train"]}])}),
        capsys,
        "give data.path (one dataset) or data.datasets",
    )


def _hub_cache(root: Path, repo_type: str, name: str, files: dict[str, Path]) -> None:
    """The Hugging Face cache layout: <type>s--org--name/snapshots/<rev>/... and refs/main holding <rev>."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"{repo_type}s--{name.replace('/', '--')}"
    for rel, src in files.items():
        dst = repo / "snapshots" / rev / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(rev)


def test_hub_names_resolve_from_a_local_cache_offline(toy, tmp_path):
    hub = tmp_path / "hf" / "hub"
    _hub_cache(hub, "model", "toyorg/tiny-llama", {p.name: p for p in Path(toy["model"]).iterdir() if p.is_file()})
    _hub_cache(
        hub,
        "dataset",
        "toyorg/reviews",
        {"data/train.jsonl": Path(toy["train"]), "data/validation.jsonl": Path(toy["eval"])},
    )
    env = {
        "HF_HUB_CACHE": str(hub),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"),
        "HF_HOME": str(tmp_path / "hf"),
    }
    out = tmp_path / "out"
    launch(
        1,
        base_overrides(
            toy,
            out,
            **{
                "model.name_or_path": "toyorg/tiny-llama",
                "data.path": "toyorg/reviews",
                "data.eval_path": "toyorg/reviews",
                "train.max_steps": 1,
            },
        ),
        env=env,
    )
    report = json.loads((out / "fish_report.json").read_text())
    assert report["data_rows"] == {"data.path": 256, "data.eval_path": 16}  # train.jsonl, validation.jsonl
    # outputs that fit the Hub: the adapter and the model card name the Hub ids, not the cache snapshot folders
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "toyorg/tiny-llama"
    from huggingface_hub import ModelCard

    meta = ModelCard.load(out / "README.md").data.to_dict()
    assert meta["base_model"] == "toyorg/tiny-llama" and meta["datasets"] == ["toyorg/reviews"]
    # fishds merge and generate take the Hub id (merge: --base; generate: from adapter_config.json), offline
    cli = [sys.executable, "-m", "fishds.cli"]
    run = dict(capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, **env})
    merged = tmp_path / "merged"
    proc = subprocess.run(
        cli + ["merge", "--base", "toyorg/tiny-llama", "--adapter", str(out), "--out", str(merged)], **run
    )
    assert proc.returncode == 0, proc.stderr
    assert (merged / "config.json").is_file() and proc.stdout.strip().splitlines()[-1] == str(merged)
    proc = subprocess.run(
        cli + ["generate", "--adapter", str(out), "--prompt", "good movie", "--max_new_tokens", "3"], **run
    )
    assert proc.returncode == 0, proc.stderr
    proc = launch(
        1, base_overrides(toy, tmp_path / "out2", **{"model.name_or_path": "toyorg/missing"}), env=env, expect_ok=False
    )
    assert proc.returncode != 0
    assert "model.name_or_path='toyorg/missing' is not a local path, and the Hugging Face Hub model" in proc.stderr
    assert str(hub) in proc.stderr and "offline=True" in proc.stderr
    proc = launch(
        1,
        base_overrides(
            toy, tmp_path / "out3", **{"model.name_or_path": "toyorg/tiny-llama", "data.path": "toyorg/nothing"}
        ),
        env=env,
        expect_ok=False,
    )
    assert "data.path='toyorg/nothing' is not a local path, and the Hugging Face Hub dataset" in proc.stderr
