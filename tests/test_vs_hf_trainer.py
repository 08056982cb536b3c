"""bench/vs_hf_trainer.py end to end on the toy Llama: four launches (Hugging Face Trainer and fishds train, plain
LoRA and FISH-LoRA), 1 rank, ZeRO-2, 2 measured steps; the run lines and the ratio lines it prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

RUN_FIELDS = {
    "trainer": str,
    "selection": str,
    "tokens_per_s": float,
    "peak_rss_mb": float,
    "peak_rss_train_mb": float,
    "steps": int,
    "tokens": int,
    "seconds": float,
    "micro_batch_size": int,
    "zero_stage": int,
    "ranks": int,
    "model": str,
    "cpu_s": float,
    "tokens_per_cpu_s": float,
}


def test_vs_hf_trainer_driver(toy, tmp_path):
    out = tmp_path / "vs.jsonl"
    cmd = [
        sys.executable,
        "bench/vs_hf_trainer.py",
        "--model",
        toy["model"],
        "--data",
        toy["train"],
        "--ranks",
        "1",
        "--steps",
        "2",
        "--ds-config",
        "ds_configs/zero2.json",
        "--lora-r",
        "4",
        "--targets",
        "q_proj,v_proj",
        "--max-length",
        "64",
        "--num-samples",
        "8",
        "--out",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert printed == lines and len(lines) == 8

    runs = {(r["trainer"], r["selection"]): r for r in lines[:4]}
    assert sorted(runs) == [("fishds", "dense"), ("fishds", "fisher"), ("hf", "dense"), ("hf", "fisher")]
    for r in runs.values():
        for field, kind in RUN_FIELDS.items():
            assert isinstance(r[field], kind), (field, r)
        assert r["steps"] == 2 and r["micro_batch_size"] == 4 and r["zero_stage"] == 2 and r["ranks"] == 1
        assert r["model"] == "model" and r["tokens"] > 0 and r["seconds"] > 0 and r["peak_rss_mb"] > 100
        assert abs(r["tokens_per_s"] - r["tokens"] / r["seconds"]) <= 0.02 * r["tokens_per_s"] + 0.01
        assert r["peak_rss_train_mb"] <= r["peak_rss_mb"] and r["cpu_s"] > 0
    # fishds' data order depends on train.seed only: plain and FISH runs train on the same batches
    assert runs["fishds", "dense"]["tokens"] == runs["fishds", "fisher"]["tokens"]

    ratios = lines[4:]
    vs = {r["selection"]: r for r in ratios if r["ratio"] == "fishds/hf"}
    cost = {r["trainer"]: r for r in ratios if r["ratio"] == "fisher/dense"}
    assert sorted(vs) == ["dense", "fisher"] and sorted(cost) == ["fishds", "hf"]
    for sel, r in vs.items():
        fd, hf = runs["fishds", sel], runs["hf", sel]
        assert abs(r["tokens_per_s"] - fd["tokens_per_s"] / hf["tokens_per_s"]) < 1e-3 * r["tokens_per_s"] + 1e-4
        assert abs(r["peak_rss_mb"] - fd["peak_rss_mb"] / hf["peak_rss_mb"]) < 1e-3
        cpu = fd["tokens_per_cpu_s"] / hf["tokens_per_cpu_s"]
        assert abs(r["tokens_per_cpu_s"] - cpu) < 1e-3 * cpu
        assert r["met"] == (r["tokens_per_s"] >= 1.0 and r["peak_rss_mb"] <= 1.0)
    for trainer, r in cost.items():
        dense, fish = runs[trainer, "dense"], runs[trainer, "fisher"]
        assert abs(r["step_time"] - dense["tokens_per_s"] / fish["tokens_per_s"]) < 1e-3 * r["step_time"] + 1e-4
        assert r["met"] == (r["step_time"] <= 1.03 and r["peak_rss_mb"] <= 1.03)
    assert all(r["command"].startswith("python bench/vs_hf_trainer.py --model") for r in ratios)
