"""fishds.integrations.hf.FishCallback inside a Hugging Face Trainer, 2 CPU ranks (gloo): DeepSpeed ZeRO-2
(torchrun; with a dense warm-up step, checkpoints and a resume), ZeRO-3 (accelerate launch), and no DeepSpeed
(DDP, torchrun); TRL's SFTTrainer under ZeRO-3 (torchrun).

Each run: exactly k entries selected; every masked entry of the saved adapter equals the adapter before
training bit for bit (AdamW with weight decay 0.1, so enforcement is needed: masked lora_A entries are
non-zero); every selected entry moved. Without warm-up the mask equals the one fishds' own trainer picks
for the same model, data, seeds and N (fishds' run is started in the DDP launch, after the Trainer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from fishds.dist import _free_port
from fishds.fish.mask import load_masks

K = 224  # floor(0.25 * 896): LoRA r=4 on q,v of the 2-layer toy Llama


def _run(toy, out, *extra, accelerate=False, timeout=300):
    if accelerate:  # accelerate's launcher (its multi-process launch works on CPU ranks too)
        port = str(_free_port())
        launcher = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            port,
        ]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [
        *launcher,
        "tests/hf_case.py",
        "--model",
        toy["model"],
        "--train",
        toy["train"],
        "--out",
        str(out),
        *map(str, extra),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _check_run(out) -> dict[str, torch.Tensor]:
    masks = load_masks(out / "fish_mask.safetensors")
    final = load_file(str(out / "adapter_model.safetensors"))
    start = load_file(str(out / "start_adapter.safetensors"))
    assert sorted(masks) == sorted(final) == sorted(start)
    assert sum(int(m.sum()) for m in masks.values()) == K
    moved = 0
    for key, m in masks.items():
        assert final[key].shape == m.shape and final[key].dtype == torch.float32
        assert torch.equal(final[key][~m], start[key][~m]), f"masked entries of {key} moved"
        moved += int((final[key][m] != start[key][m]).sum())
    assert moved == K, f"only {moved}/{K} selected entries moved"
    assert any(float(start[k][~m].abs().sum()) > 0 for k, m in masks.items()), "no non-zero masked entry: weak test"
    return masks


@pytest.fixture(scope="module")
def ddp_and_fishds(toy, tmp_path_factory):
    """Trainer without DeepSpeed (DDP on gloo), then fishds' own trainer in the same launch."""
    root = tmp_path_factory.mktemp("hf_ddp")
    proc = _run(toy, root / "hf", "--then_fishds", root / "fishds")
    assert "engine DistributedDataParallel" in proc.stdout
    return root


def test_hf_trainer_without_deepspeed_matches_fishds(ddp_and_fishds):
    masks = _check_run(ddp_and_fishds / "hf")
    ref = load_masks(ddp_and_fishds / "fishds" / "fish_mask.safetensors")
    assert sorted(ref) == sorted(masks) and all(torch.equal(ref[k], masks[k]) for k in ref)


def test_hf_trainer_deepspeed_zero3_matches_fishds(toy, tmp_path, ddp_and_fishds):
    # stage3_gather_16bit_weights_on_model_save stays false: trainer.save_model gathers the PEFT adapter itself
    proc = _run(toy, tmp_path / "out", "--ds_config", ROOT / "ds_configs" / "zero3.json", accelerate=True)
    assert "engine DeepSpeedEngine" in proc.stdout
    report = json.loads((tmp_path / "out" / "fish_selection.json").read_text())
    assert report["zero_stage"] == 3 and report["world_size"] == 2 and report["k"] == K
    masks = _check_run(tmp_path / "out")
    ref = load_masks(ddp_and_fishds / "fishds" / "fish_mask.safetensors")
    assert all(torch.equal(ref[k], masks[k]) for k in ref)


def test_trl_sft_trainer_deepspeed_zero3(toy, tmp_path):
    """TRL's SFTTrainer as docs/hf-trainer.md shows it (model by name, peft_config, prompt/completion rows that TRL
    tokenizes, its own collator), 2 ranks under ZeRO-3: exactly k selected, masked entries unchanged bit for bit,
    every selected entry moved; the model card names the run."""
    out = tmp_path / "out"
    proc = _run(toy, out, "--ds_config", ROOT / "ds_configs" / "zero3.json", "--trl")
    assert "done: SFTTrainer, engine DeepSpeedEngine" in proc.stdout
    report = json.loads((out / "fish_selection.json").read_text())
    assert report["zero_stage"] == 3 and report["world_size"] == 2 and report["k"] == K
    _check_run(out)
    card = (out / "README.md").read_text()
    assert "SFTTrainer + fishds FishCallback" in card and f"| trained entries (k) | {K} " in card


def test_hf_trainer_deepspeed_zero2_warmup_checkpoints_resume(toy, tmp_path):
    out = tmp_path / "out"
    proc = _run(
        toy,
        out,
        "--ds_config",
        ROOT / "ds_configs" / "zero2.json",
        "--warmup_steps",
        1,
        "--save_steps",
        2,
        "--resume_from",
        2,
    )
    assert "engine DeepSpeedEngine" in proc.stdout and "FISH mask fixed at step 1" in proc.stdout
    report = json.loads((out / "fish_selection.json").read_text())
    assert report["zero_stage"] == 2 and report["step"] == 1
    masks = _check_run(out)  # unselected entries were reset to their start values after the dense step
    for step in (2, 4):
        saved = load_masks(out / f"checkpoint-{step}" / "fish_mask.safetensors")
        assert all(torch.equal(saved[k], masks[k]) for k in masks)
    # a new Trainer + FishCallback resumed from checkpoint-2 reads its mask and ends bit-identical
    assert f"resumed: mask file {out / 'checkpoint-2' / 'fish_mask.safetensors'}" in proc.stdout
    final, resumed = (load_file(str(d / "adapter_model.safetensors")) for d in (out, out / "resumed"))
    assert sorted(final) == sorted(resumed) and all(torch.equal(final[k], resumed[k]) for k in final)


def test_hf_callback_default_rule_scores_after_dense_steps(toy, tmp_path):
    """FishCallback() without warmup_steps uses fishds' default: min(20, max_steps // 5) dense steps, never scores at
    LoRA's initialisation (10 steps: 2 dense)."""
    out = tmp_path / "out"
    proc = _run(toy, out, "--warmup_steps", -1, "--steps", 10)
    assert "FISH warm-up: 2 dense steps before scoring" in proc.stdout
    assert "FISH mask fixed at step 2" in proc.stdout
    report = json.loads((out / "fish_selection.json").read_text())
    assert report["step"] == 2 and report["warmup_steps"] == 2
    _check_run(out)


# ---- clear errors, in-process (no Trainer run) -------------------------------------------------------------


def _tiny(toy, peft: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy["model"])
    if peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    return model


def test_hf_callback_errors(toy):
    from fishds.integrations.hf import FishCallback, FishError

    fish = FishCallback(num_selected=4)
    with pytest.raises(FishError, match="before the Trainer created its optimizer"):
        fish.fix_mask(SimpleNamespace(optimizer=None))  # e.g. called before trainer.train()
    with pytest.raises(FishError, match="before the Trainer built its DeepSpeed engine"):
        fish._engine(
            SimpleNamespace(optimizer=object(), is_deepspeed_enabled=True, model_wrapped=torch.nn.Linear(1, 1))
        )
    with pytest.raises(FishError, match="could not find its Trainer"):
        fish.on_train_begin(None, SimpleNamespace(global_step=0), None)
    with pytest.raises(FishError, match="not a PEFT model"):
        fish._pools(_tiny(toy, peft=False))
    frozen = _tiny(toy, peft=True)
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(FishError, match="no trainable parameters"):
        fish._pools(frozen)
    with pytest.raises(FishError, match="not both"):
        FishCallback(keep_ratio=0.1, num_selected=3)
