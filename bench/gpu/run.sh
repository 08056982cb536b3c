#!/usr/bin/env bash
# The GPU figures in one prepared script: one NVIDIA GPU, no network, only the repository (+ .whl/) on the machine.
#
#   bench/gpu/fetch_wheels.sh        # here, once, with PyPI: the missing packages into .whl/ (git-ignored)
#   bench/gpu/run.sh                 # there: about 6-8 minutes on an H200; JSON lines into bench/results/gpu/
#   bench/gpu/run.sh --cpu-smoke     # anywhere: every part at toy size on CPU, 1 rank, in a few minutes
#
# Parts, each its own JSON lines file (a failed part writes {"part", "status": "failed", "rc"} and the rest go on):
#   env.jsonl            versions, the device, and what the stand-ins are (bench/gpu/prepare.py)
#   step_time.jsonl      bf16 step time FISH vs plain, Fisher pass cost (bench/step_time.py, SmolLM2 shape, ZeRO-2)
#   qlora_case.jsonl     NF4 QLoRA step time FISH vs plain and peak GPU memory against `fishds plan`: SmolLM2 shape,
#                        then a Llama-2-7B shape built on the GPU with random weights (bench/gpu/qlora_case.py --build)
#   fisher_pass.jsonl    batched vs looped vs per-batch Fisher pass (bench/fisher_pass.py, if this tree has it)
#   vs_hf_trainer.jsonl  fishds train vs Hugging Face Trainer (+FishCallback), 1 rank (bench/vs_hf_trainer.py)
#   loss_path.jsonl      full vs chunked cross-entropy at Llama-3's 128,256-token vocabulary, bf16, peak GPU memory
#                        and step time at 2,048 / 8,192 / 16,384 tokens per micro-batch (bench/loss_path.py)
#   run.log              everything printed
# SmolLM2 here has RANDOM weights (its config and tokenizer travel in bench/gpu/smollm2/; the 538 MB weights
# cannot) and the data are synthetic: time and memory depend on shapes; no loss or accuracy here means anything.
# Results also go to $OUT when set. FISHDS_GPU_RESULTS overrides the results folder.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
SMOKE=0
[[ "${1:-}" == "--cpu-smoke" ]] && SMOKE=1
START=$(date +%s)
WORK=$(mktemp -d /tmp/fishds-gpu-XXXXXX)
export FISHDS_CACHE=$WORK/cache OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [[ $SMOKE == 1 ]]; then
  PY=${PY:-$ROOT/.venv/bin/python}
  RES=${FISHDS_GPU_RESULTS:-$WORK/results}
  export CUDA_VISIBLE_DEVICES=""
  TINY=--tiny
else
  PY=${PY:-python3}
  RES=${FISHDS_GPU_RESULTS:-$ROOT/bench/results/gpu}
  TINY=
  if compgen -G ".whl/*" >/dev/null; then  # packages the image lacks, carried as wheels (+ the deepspeed sdist)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && PYTHONPATH=/tmp/site $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
        --target /tmp/site-ds .whl/deepspeed-*.tar.gz || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site-ds:/tmp/site
  fi
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} FISHDS_BENCH_RESULTS=$RES
mkdir -p "$RES"
LOG=$RES/run.log
: > "$LOG"
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1)

note() { echo "[gpu/run.sh $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
part() {  # part NAME TIMEOUT_S CMD...: run, log, and record a failure as a JSON line
  local name=$1 limit=$(( $2 * (SMOKE ? 4 : 1) )); shift 2  # the smoke on a shared CPU: more time per part
  note "$name: $*"
  timeout "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  if [[ $rc != 0 ]]; then
    echo "{\"part\": \"$name\", \"status\": \"failed\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - START ))}" \
      >> "$RES/$name.jsonl"
    note "$name FAILED (rc $rc); see run.log"
  fi
}

# 0. what is here, and the offline stand-ins
part env 120 "$PY" - "$TINY" <<'EOF'
import json, os, platform, subprocess, sys
import torch
info = {"part": "env", "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
for name in ("deepspeed", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "pydantic"):
    try:
        info[name] = __import__(name).__version__
    except Exception as e:  # noqa: BLE001
        info[name] = f"missing ({type(e).__name__}: {e})"[:200]
cache = os.environ["FISHDS_CACHE"]
tiny = [a for a in sys.argv[1:] if a]
out = subprocess.run([sys.executable, "bench/gpu/prepare.py", "--cache", cache, "--llama7b", cache + "/llama7b", *tiny],
                     capture_output=True, text=True)
sys.stderr.write(out.stderr[-3000:])
if out.returncode:
    sys.exit(out.returncode)
info.update(json.loads(out.stdout.strip().splitlines()[-1]))
line = json.dumps(info)
print(line)
open(os.environ["FISHDS_BENCH_RESULTS"] + "/env.jsonl", "a").write(line + "\n")
EOF
LLAMA=$FISHDS_CACHE/llama7b

if [[ $SMOKE == 1 ]]; then  # toy sizes: the same code paths, seconds per part
  ST_ARGS=(--rounds 1 --block 2 fish.num_samples=4 data.max_examples=64 train.micro_batch_size=2)
  Q_SMOL=(--rounds 1 --block 1 fish.num_samples=4 data.max_examples=64 data.max_length=64)
  Q_7B=(--rounds 1 --block 1 fish.num_samples=2 data.max_length=64 train.micro_batch_size=1)
  FP_ARGS=(--num-samples 8 --micro-batch-size 4)
  HF_ARGS=(--steps 2 --max-length 64 --max-examples 64 --num-samples 4 --precision fp32)  # Trainer: no bf16 on CPU
  LP_ARGS=(--tokens 64 128 --steps 1 --vocab 8192 --precision fp32)
else
  ST_ARGS=(--rounds 3 --block 5 fish.num_samples=32 data.max_examples=2000 train.micro_batch_size=8)
  Q_SMOL=(--rounds 3 --block 5 fish.num_samples=32 data.max_examples=2000 data.max_length=512)
  Q_7B=(--rounds 2 --block 3 fish.num_samples=8 data.max_length=512 train.micro_batch_size=1)
  FP_ARGS=(--num-samples 64 --micro-batch-size 8)
  HF_ARGS=(--steps 20 --max-length 128 --max-examples 2000 --num-samples 16 --precision bf16)
  LP_ARGS=(--tokens 2048 8192 16384 --steps 3 --precision bf16)  # 16,384 = Llama-3-8B's 4 x 4,096 micro-batch
fi

# 1. bf16 step time, FISH vs plain (SmolLM2 shape, ZeRO-2, 1 rank)
part step_time 150 "${TORCHRUN[@]}" bench/step_time.py --config configs/demo.yaml --ds_config ds_configs/zero2.json \
  "${ST_ARGS[@]}" train.precision=bf16

# 2. NF4 QLoRA: SmolLM2 shape, then the Llama-2-7B shape built on the device; peak memory against the plan
part qlora_case 120 "${TORCHRUN[@]}" bench/gpu/qlora_case.py --name smollm2-nf4 --config configs/demo.yaml \
  --ds_config ds_configs/zero2.json "${Q_SMOL[@]}" train.precision=bf16 data.packing=true fish.granularity=batch
part qlora_case 200 "${TORCHRUN[@]}" bench/gpu/qlora_case.py --name llama7b-shape-nf4 --build \
  --config configs/demo.yaml --ds_config ds_configs/zero2.json "${Q_7B[@]}" model.name_or_path="$LLAMA" \
  data.path="$LLAMA/train.jsonl" data.max_examples=2000 data.packing=true peft.target_modules=all-linear \
  peft.r=8 peft.alpha=16 fish.keep_ratio=0.1 fish.granularity=batch train.precision=bf16
if [[ $SMOKE == 0 ]]; then  # the plan alone, for the record (CLI as users call it)
  "$PY" -m fishds.cli plan llama-7b --zero 2 --world 1 --quant 4 --r 8 --keep_ratio 0.1 --micro_batch 1 \
    --seq_len 512 >> "$LOG" 2>&1
fi

# 3. Fisher pass: batched vs looped vs per-batch (bench/fisher_pass.py, when present)
if [[ -f bench/fisher_pass.py ]]; then
  part fisher_pass 120 "$PY" bench/fisher_pass.py --ranks 1 --model smollm2 --zero-stage 3 "${FP_ARGS[@]}" \
    --out "$RES/fisher_pass.jsonl"
else
  echo "{\"part\": \"fisher_pass\", \"status\": \"skipped\", \"why\": \"bench/fisher_pass.py is not in this tree\"}" \
    >> "$RES/fisher_pass.jsonl"
  note "fisher_pass skipped: bench/fisher_pass.py is not in this tree"
fi

# 4. fishds train vs the Hugging Face Trainer, plain and FISH, 1 rank
part vs_hf_trainer 240 "$PY" bench/vs_hf_trainer.py --ranks 1 --ds-config ds_configs/zero2.json "${HF_ARGS[@]}" \
  --out "$RES/vs_hf_trainer.jsonl" --note "random weights (SmolLM2 shape), synthetic data"

# 5. the loss path: full vs chunked cross-entropy at a 128,256-token vocabulary (2-layer Llama, random weights)
part loss_path 240 "$PY" bench/loss_path.py --ranks 1 "${LP_ARGS[@]}" --note "1 GPU, random weights, synthetic text"

note "done in $(( $(date +%s) - START ))s; results in $RES"
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
  cp "$RES"/*.jsonl "$RES"/run.log "$OUT"/ 2>/dev/null
fi
rm -rf "$WORK"
