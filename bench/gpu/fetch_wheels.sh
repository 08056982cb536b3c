#!/usr/bin/env bash
# Fill .whl/ (in .gitignore: a device call must name it in carry) with what the GPU machine's image lacks for
# bench/gpu/run.sh. That machine has no network; its image has CUDA torch, transformers, accelerate, safetensors,
# numpy, pyarrow, pandas, tokenizers, psutil, py-cpuinfo, ninja, msgpack, einops, tqdm, pyyaml, huggingface-hub,
# xxhash, fsspec, matplotlib, tensorboard (the workplace's device notes), but not these. DeepSpeed is published
# as a source archive only; run.sh builds it there without build isolation (no ops compiled: fishds passes a
# torch AdamW).
# About 50 MB: the tree that travels must stay under 64 MiB. transformers stays the image's own (5.17 was seen
# there; fishds pins 5.23): add transformers==5.23.0 (13 MB) only if the budget allows.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for pkg in bitsandbytes==0.50.2 peft==0.21.2 datasets==5.2.0 dill==0.4.1 "multiprocess<0.70.20" pydantic==2.14.4 \
           pydantic-core==2.50.5 annotated-types typing-inspection hjson; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
    -d .whl "$pkg"
done
python3 -m pip download -q --no-deps --no-binary=:all: -d .whl deepspeed==0.19.8
du -ch .whl/* | tail -1
