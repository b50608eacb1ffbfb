#!/usr/bin/env bash
# Everything a session lent a GPU should check, in ONE call that ends within 9 minutes (a session's device time is
# short and a second start costs minutes). Works on a bare copy of the working tree: no network, no ../shared, no
# pip install (PYTHONPATH=. instead); needs torch (CUDA build), numpy, numba and pytest.
#
#   bash bench/gpu_session.sh            # on the GPU machine; output also in $OUT/gpu_session.log, $OUT/summary.txt
#   bash bench/gpu_session.sh --smoke    # anywhere, on the CPU: tiny sizes and short time boxes (CUDA-only: SKIP)
#
# Steps, each time-boxed and ending with a PASS / FAIL / TIMEOUT / SKIP line:
#   env        nvidia-smi -L, python, torch + CUDA, numba versions
#   flags      every lmtrain.main flag this script passes exists in `python -m lmtrain.main --help`
#   pytest     pytest -m cuda: the loader's CUDA tests and the trainer's (tests/lmtrain/test_cuda.py: bf16, fused
#              AdamW, kill -9 then resume, SIGTERM, non-finite stop, a CUDA checkpoint loaded on a CPU-only process)
#              and the document mask's (tests/lmtrain/test_doc_mask.py: compiled FlexAttention, float32, against each
#              document alone, and its backward)
#   gpu_check  python -m bench.gpu_check: the Trainer's step with and without the loader, pinned vs pageable H2D
#   flex       python -m bench.gpu_flex: document masking with compiled FlexAttention, its logits against each
#              document run alone (bf16) and its speed against unmasked SDPA at B=8, T=2048, d_model 768, 12 heads
#   run        GPT-2-small shape (d_model 768, 12 layers, 12 heads, d_ff 2048, T 1024, vocab 50257: 124M
#              parameters besides the embedding), 60 steps with --async-checkpoint: tokens/s, MFU, data stall
#   resume     the same command to 70 steps: must resume at step 60
#   options    grouped-query attention and tied embeddings (--num-kv-heads 4 --tie-embeddings: SDPA enable_gqa under
#              bf16 autocast) for a few steps, then evaluate (bits per byte) and export on the GPU run
#   compile    the same model with --compile for a few steps
# Exit status: the number of steps that did not PASS (SKIP counts as passing), capped at 100.

set -u -o pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1

OUT_DIR="${OUT:-$(mktemp -d /tmp/gpu_session_out.XXXXXX)}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_session.log"
SUMMARY="$OUT_DIR/summary.txt"
: >"$LOG"
: >"$SUMMARY"
exec > >(tee -a "$LOG") 2>&1

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PY="${PYTHON:-python}"
export WORK
WORK="$(mktemp -d /tmp/gpu_session_work.XXXXXX)"
export SMOKE
if ((SMOKE)); then
  export OMP_NUM_THREADS=1
  TOTAL_S=150 # the whole script's deadline: every step's box is cut to what is left of it
  export DEVICE=cpu DTYPE=float32
  MODEL=(--d-model 64 --num-layers 2 --num-heads 2 --d-ff 128 --context-length 64 --batch-size 4)
  export VOCAB=512 TRAIN_TOKENS=200000 STEPS=6 RESUME_STEPS=8 COMPILE_STEPS=3 OPTIONS_STEPS=4 KV_HEADS=1
else
  TOTAL_S=500 # under 9 minutes with the last box's kill grace and the summary
  export DEVICE=cuda DTYPE=auto
  MODEL=(--d-model 768 --num-layers 12 --num-heads 12 --d-ff 2048 --context-length 1024 --batch-size 32)
  export VOCAB=50257 TRAIN_TOKENS=20000000 STEPS=60 RESUME_STEPS=70 COMPILE_STEPS=12 OPTIONS_STEPS=10 KV_HEADS=4
fi
COMMON=(--train-data "$WORK/data/train" --val-data "$WORK/data/val" "${MODEL[@]}" --device "$DEVICE" --dtype "$DTYPE"
  --lr 6e-4 --min-lr 6e-5 --warmup-steps 10 --log-interval 10 --eval-interval 0 --eval-batches 4)
RUN_FLAGS=("${COMMON[@]}" --out-dir "$WORK/run" --checkpoint-interval 30 --async-checkpoint)
COMPILE_FLAGS=("${COMMON[@]}" --out-dir "$WORK/compiled" --max-steps "$COMPILE_STEPS" --compile --log-interval 4)
OPTIONS_FLAGS=("${COMMON[@]}" --out-dir "$WORK/options" --max-steps "$OPTIONS_STEPS" --log-interval 2 --num-kv-heads "$KV_HEADS"
  --tie-embeddings)
export RUN_FLAGS_STR="${RUN_FLAGS[*]}" COMPILE_FLAGS_STR="${COMPILE_FLAGS[*]}" OPTIONS_FLAGS_STR="${OPTIONS_FLAGS[*]}"

DEADLINE=$((SECONDS + TOTAL_S))
NOT_PASSED=0

record() { printf '%-10s %-8s %5ss  %s\n' "$1" "$2" "$3" "$4" >>"$SUMMARY"; }

skip() {
  echo
  echo "===== [$1] SKIP: $2"
  record "$1" SKIP 0 "$2"
}

# step NAME BOX_SECONDS COMMAND...: run COMMAND under `timeout`, cut to the time left before the deadline
step() {
  local name=$1 box=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  echo
  echo "===== [$name] $(date -u +%H:%M:%S) time box ${box}s (${left}s left of the session's ${TOTAL_S}s) ====="
  if ((left < 10)); then
    echo "TIMEOUT: [$name] no time left"
    record "$name" TIMEOUT 0 "not run: no time left in the session"
    NOT_PASSED=$((NOT_PASSED + 1))
    return
  fi
  ((box > left)) && box=$left
  local t0=$SECONDS status
  timeout --kill-after=10 "$box" "$@"
  local rc=$?
  if ((rc == 0)); then status=PASS; elif ((rc == 124 || rc == 137)); then status=TIMEOUT; else status=FAIL; fi
  echo "$status: [$name] exit $rc after $((SECONDS - t0))s"
  record "$name" "$status" $((SECONDS - t0)) "exit $rc"
  [[ $status == PASS ]] || NOT_PASSED=$((NOT_PASSED + 1))
}

env_line() {
  if command -v nvidia-smi >/dev/null; then nvidia-smi -L; else echo "nvidia-smi: not found"; fi
  echo "cpus $(getconf _NPROCESSORS_ONLN), python $($PY -c 'import sys; print(sys.version.split()[0])'), $(df -h /tmp | tail -1)"
  $PY - <<'EOF'
import torch
try:
    import numba
    nb = numba.__version__
except ImportError:
    nb = "missing"
cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if cuda else "-"
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, GPU available {cuda} ({name}), numba {nb}")
import os, lmtrain
print(f"lmtrain from {lmtrain.__file__}")
assert lmtrain.__file__.startswith(os.getcwd() + os.sep), "lmtrain is not this working tree's"
EOF
}

check_flags() {
  local help missing=0
  help="$($PY -m lmtrain.main --help)" || return 1
  for flag in $RUN_FLAGS_STR $COMPILE_FLAGS_STR $OPTIONS_FLAGS_STR --resume --max-steps; do
    [[ $flag == --* ]] || continue
    if ! grep -qE -- "(^|[ ,])$flag([ ,=]|$)" <<<"$help"; then
      echo "unknown flag: $flag"
      missing=1
    fi
  done
  ((missing == 0)) && echo "every flag exists"
  return $missing
}

make_data() {
  $PY - <<'EOF'
import os
import numpy as np
from lmdata import write_shards

vocab, n, work = int(os.environ["VOCAB"]), int(os.environ["TRAIN_TOKENS"]), os.environ["WORK"]
rng = np.random.default_rng(0)
write_shards([rng.integers(0, vocab, n, dtype=np.uint16)], f"{work}/data/train", vocab_size=vocab)
write_shards([rng.integers(0, vocab, 500_000, dtype=np.uint16)], f"{work}/data/val", vocab_size=vocab)
print(f"random uint16 shards, vocab {vocab}: {n:,} train tokens in {work}/data")
EOF
}

# report METRICS_JSONL LAST_STEP: tokens/s, MFU and data stall of the train records after the first (warm-up)
report() {
  $PY - "$1" "$2" <<'EOF'
import json, math, statistics, sys

records = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in records if r["event"] == "train"]
assert train and train[-1]["step"] == int(sys.argv[2]), f"last train record at step {train[-1]['step'] if train else None}"
assert all(math.isfinite(r["train_loss"]) for r in train), "a non-finite train loss"
steady = train[1:] or train
mfu = [r["mfu_pct"] for r in steady if "mfu_pct" in r]
print(
    f"steps {train[0]['step']}..{train[-1]['step']}: loss {train[0]['train_loss']:.3f} -> {train[-1]['train_loss']:.3f}, "
    f"tokens/s {statistics.median(r['tokens_per_s'] for r in steady):,.0f}, "
    f"MFU {f'{statistics.median(mfu):.1f}%' if mfu else 'not reported'}, "
    f"data stall {statistics.median(r['data_stall_pct'] for r in steady):.2f}% (medians over records after the first)"
)
EOF
}

train_run() {
  # shellcheck disable=SC2086 - the flags hold no spaces (paths under mktemp)
  $PY -m lmtrain.main $RUN_FLAGS_STR --max-steps "$STEPS" || return 1
  ls "$WORK/run/checkpoints"
  [[ -f "$WORK/run/checkpoints/step_$(printf %08d "$STEPS").pt" ]] || { echo "no checkpoint at step $STEPS"; return 1; }
  report "$WORK/run/metrics.jsonl" "$STEPS"
}

resume_run() {
  local out
  # shellcheck disable=SC2086
  out="$($PY -m lmtrain.main $RUN_FLAGS_STR --max-steps "$RESUME_STEPS")" || { echo "$out" | tail -20; return 1; }
  echo "$out" | grep -E "resumed from|done at"
  grep -q "at step $STEPS" <<<"$(grep "resumed from" <<<"$out")" || { echo "did not resume at step $STEPS"; return 1; }
  report "$WORK/run/metrics.jsonl" "$RESUME_STEPS"
}

options_run() {
  # shellcheck disable=SC2086
  $PY -m lmtrain.main $OPTIONS_FLAGS_STR || return 1
  report "$WORK/options/metrics.jsonl" "$OPTIONS_STEPS" || return 1
  $PY -m lmtrain.evaluate "$WORK/options" --data "$WORK/data/val" --batches 4 --device "$DEVICE" || return 1
  $PY -m lmtrain.export "$WORK/options" --out "$WORK/options_hf" --dtype bfloat16 || return 1
  ls "$WORK/options_hf"
}

compile_run() {
  # shellcheck disable=SC2086
  $PY -m lmtrain.main $COMPILE_FLAGS_STR || return 1
  report "$WORK/compiled/metrics.jsonl" "$COMPILE_STEPS"
}
export -f report train_run resume_run options_run compile_run

echo "gpu_session $( ((SMOKE)) && echo "--smoke " )$(date -u +%Y-%m-%dT%H:%M:%SZ), log $LOG, work dir $WORK"
step env 30 bash -c "$(declare -f env_line); env_line"
step flags 60 bash -c "$(declare -f check_flags); check_flags"
if ((SMOKE)); then
  step pytest 90 "$PY" -m pytest -m cuda -q -p no:cacheprovider tests/lmtrain/test_cuda.py # all skip on the CPU
else
  step pytest 200 "$PY" -m pytest -m cuda -q -p no:cacheprovider
fi
if ((SMOKE)); then
  step gpu_check 60 "$PY" -m bench.gpu_check --smoke --out "$OUT_DIR/gpu_check.json"
else
  step gpu_check 120 "$PY" -m bench.gpu_check --out "$OUT_DIR/gpu_check.json"
fi
if ((SMOKE)); then
  step flex 60 "$PY" -m bench.gpu_flex --smoke --out "$OUT_DIR/gpu_flex.json"
else
  step flex 150 "$PY" -m bench.gpu_flex --out "$OUT_DIR/gpu_flex.json"
fi
step data 60 bash -c "$(declare -f make_data); make_data"
step run 120 bash -c train_run
step resume 60 bash -c resume_run
step options 90 bash -c options_run
if ((SMOKE)); then
  skip compile "smoke: torch.compile takes ~20 s on this CPU; its flags were checked in [flags]"
else
  step compile 150 bash -c compile_run
fi

rm -rf "$WORK"
echo
echo "===== summary ($((SECONDS))s in all; $NOT_PASSED step(s) did not pass) ====="
cat "$SUMMARY"
echo "gpu_session: $( ((NOT_PASSED == 0)) && echo ALL PASSED || echo "$NOT_PASSED NOT PASSED")"
exit $((NOT_PASSED > 100 ? 100 : NOT_PASSED))
