"""fishds training entry point.

deepspeed --num_gpus 2 launch/train.py --ds_config ds_configs/zero3.json --config configs/demo.yaml [key=value ...]
torchrun --nproc_per_node 2 launch/train.py --config configs/demo.yaml fish.keep_ratio=0.1
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fishds.dist import prefer_cpu_accelerator_if_no_cuda  # noqa: E402

prefer_cpu_accelerator_if_no_cuda()

from fishds.config import ConfigError, load_config  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="FISH-LoRA fine-tuning on DeepSpeed")
    ap.add_argument("--config", help="fishds YAML config")
    ap.add_argument("--ds_config", help="DeepSpeed JSON (ds_configs/zero{0,1,2,3}.json)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from fishds.run.train import run

        run(cfg, args.ds_config)
    except ConfigError as e:
        print(f"fishds: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
