#!/usr/bin/env bash
# Issue 15's GPU part as ONE prepared script, for the device machine's 15 minutes (start-up
# included, 10 per call): the machine's facts, `pytest -m gpu` (C1 under sdpa/flex/flash in bf16,
# QLoRA step + merge, bf16 vs fp32, SIGKILL resume exact on CUDA, flex trains like sdpa), then
# benchmarks/bench_gpu.py (Qwen2.5-0.5B shape, seq 4096, full and LoRA, sdpa vs flex, Liger +
# torch.compile, TRL). Every result lands in $OUT (the device tool brings it back).
#
#   bash benchmarks/gpu_session.sh --prepare   # HERE, before the call: carry folder + wheels
#   bash benchmarks/gpu_session.sh --smoke     # HERE, on CPU: the same steps, tiny shapes
#   bash benchmarks/gpu_session.sh             # THERE: device run with carry [".gpu_carry", ".whl"]
#
# The device machine gets the working tree only: ../shared does not travel, so --prepare copies
# the two files the benchmark reads into .gpu_carry/ (git-ignored through .git/info/exclude,
# never committed), and downloads the wheels that machine lacks (bitsandbytes, liger-kernel,
# trl and what they need that is missing there) into .whl/ for Python 3.12.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-gpu}
OUT=${OUT:-bench_out/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ "$MODE" = "--prepare" ]; then
  set -e
  grep -qx '/.gpu_carry/' .git/info/exclude 2>/dev/null || echo '/.gpu_carry/' >> .git/info/exclude
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  mkdir -p .gpu_carry/shared/tokenizers/llama2 .gpu_carry/shared/data .whl
  cp ../shared/tokenizers/llama2/tokenizer.model .gpu_carry/shared/tokenizers/llama2/
  cp ../shared/data/alpaca_en_demo.json .gpu_carry/shared/data/
  for w in bitsandbytes==0.50.2 liger-kernel trl datasets jsonschema openpyxl fschat; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
      -d .whl "$w" || echo "gpu_session: could not fetch $w (that step will be skipped there)"
  done
  du -sh .gpu_carry .whl
  exit 0
fi

if [ "$MODE" = "--smoke" ]; then
  PY=${PY:-.venv/bin/python}
  SMOKE=(--smoke --steps 2 --warmup 1)
  GPU_TESTS=(tests/sfttrain/test_train_gpu.py)   # on CPU: the CPU checks run, -m gpu ones skip
  PYTEST_MARK=()
else
  PY=${PY:-python3}
  SMOKE=()
  GPU_TESTS=(tests/sfttrain/test_train_gpu.py)
  PYTEST_MARK=(-m gpu)
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl > "$OUT/wheels.txt" 2>&1 || echo "wheel install failed" >> "$OUT/wheels.txt"
    export PYTHONPATH=/tmp/site
  fi
  [ -d .gpu_carry/shared ] && export SFTPIPE_SHARED="$PWD/.gpu_carry/shared"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # the project runs from the tree as sent

# 1. facts (check the issue's description of the machine with the first command there)
{
  date -u; nvidia-smi 2>&1 | head -15
  "$PY" -c "import sys, torch, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'gpu', torch.cuda.is_available())"
  "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|accelerate|bitsandbytes|liger|trl|datasets|flash)' || true
} > "$OUT/facts.txt" 2>&1
cat "$OUT/facts.txt"

# 2. the GPU tests (about 3 minutes there)
timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest -q -p no:cacheprovider "${PYTEST_MARK[@]}" \
  "${GPU_TESTS[@]}" > "$OUT/pytest_gpu.txt" 2>&1
echo "pytest ${PYTEST_MARK[*]}: exit $?"; tail -3 "$OUT/pytest_gpu.txt"

# 3. the benchmark (full and LoRA: sdpa, flex, Liger + compile; TRL), about 5 minutes there
VARIANTS=${VARIANTS:-full-sdpa,full-flex,full-flex-liger-compile,lora-sdpa,lora-flex,trl-full,trl-lora}
timeout "${BENCH_TIMEOUT:-330}" "$PY" benchmarks/bench_gpu.py "${SMOKE[@]}" --variants "$VARIANTS" \
  --out "$OUT/bench" > "$OUT/bench_gpu.md" 2> "$OUT/bench_gpu.err"
echo "bench_gpu: exit $?"; cat "$OUT/bench_gpu.md"; tail -5 "$OUT/bench_gpu.err"
cp "$OUT/bench/results.json" "$OUT/bench_results.json" 2>/dev/null || true
rm -rf "$OUT/bench"   # model and shards: too big to bring back, the figures are in the JSON
