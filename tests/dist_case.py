"""Test driver: launch/train.py's run, plus the trained model's logits on fixed probe examples.

Run like launch/train.py (torchrun or single process). Rank 0 writes probe_logits.safetensors into
output_dir so a test can check that the saved adapter reproduces the model that trained. With
FISHDS_CASE_START_ADAPTER=1 in the environment, rank 0 also writes the adapter as it was before the first step
(every trainable tensor, keyed like the adapter) to output_dir/start/init_adapter_model.safetensors.
"""

import os
from pathlib import Path


from fishds.dist import prefer_cpu_accelerator_if_no_cuda  # noqa: E402

prefer_cpu_accelerator_if_no_cuda()

import argparse  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from fishds import dist as fdist  # noqa: E402
from fishds.config import load_config  # noqa: E402
from fishds.run.guard import RunStopped  # noqa: E402
from fishds.run.train import run  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--ds_config")
ap.add_argument("--local_rank", type=int)
ap.add_argument("overrides", nargs="*")
import faulthandler

faulthandler.dump_traceback_later(300, exit=True)  # a hung collective fails the test
args = ap.parse_args()
cfg = load_config(None, args.overrides)
if os.environ.get("FISHDS_CASE_START_ADAPTER") == "1":
    from fishds.fish.adapter import gather_adapter, save_initial_adapter
    from fishds.run import train as train_run

    fix_mask = train_run.fix_mask

    def fix_mask_after_saving_the_start(s, log):
        adapter = gather_adapter(s.trainable)  # a collective: every rank
        if fdist.is_main():
            save_initial_adapter(s.engine.module, Path(cfg.output_dir) / "start", adapter)
        return fix_mask(s, log)

    train_run.fix_mask = fix_mask_after_saving_the_start
try:
    result = run(cfg, args.ds_config)
except RunStopped as stopped:  # every rank agreed to stop (exit codes of fishds/run/guard.py): leave without the
    # interpreter's teardown, where a gloo thread can abort one rank (SIGABRT) instead of the agreed exit code
    from case_exit import exit_now  # noqa: E402

    exit_now(stopped.code)
probe = result.collate((result.eval_examples or result.test_examples)[:4])
model = result.engine.module
model.eval()
with torch.no_grad():
    logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
if fdist.is_main():
    save_file(
        {
            "logits": logits.float().contiguous(),
            "input_ids": probe["input_ids"],
            "attention_mask": probe["attention_mask"],
        },
        str(Path(cfg.output_dir) / "probe_logits.safetensors"),
    )
fdist.barrier()

from case_exit import exit_now  # noqa: E402

exit_now()
