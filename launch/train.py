"""fishds training entry point: the same start-up path as `fishds train` (fishds/cli.py), for launchers that take a
script path.

deepspeed --num_gpus 2 launch/train.py --ds_config ds_configs/zero3.json --config configs/demo.yaml [key=value ...]
torchrun --nproc_per_node 2 launch/train.py --config configs/demo.yaml fish.keep_ratio=0.1
"""

import sys

from fishds import cli


def main(argv=None) -> int:
    """`fishds train ARGV` (ARGV: the command line after the script's name)."""
    return cli.main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
