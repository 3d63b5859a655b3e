#!/usr/bin/env bash
# The installed wheel works outside the source tree (issue 11): build it, install it with the
# train extra into a fresh virtual environment, and run the main job from a folder that is not
# the clone, so nothing can be found through the source tree (schemas, templates and the tiny
# tokenizer/model are package data). Usage: .ci/wheel_smoke.sh [WORKDIR]   (default: a new temporary folder)
set -euo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$(mktemp -d)}"
mkdir -p "$WORK"
cd "$WORK"
python3 -m venv venv
venv/bin/pip install -q --upgrade pip
venv/bin/pip install -q torch==2.13.0
"$SRC/.venv/bin/pip" wheel -q --no-deps -w dist "$SRC"
WHEEL=$(ls dist/sftpipe-*.whl)
venv/bin/pip install -q "$WHEEL[train]"  # the trainer too (torch, pinned above, first)
BIN="$WORK/venv/bin"
mkdir -p run && cd run  # outside the clone: the clone's files are only read as input data
cp "$SRC/fixtures/demo/qa.csv" qa.csv
"$BIN/sftdata" convert qa.csv -o qa.jsonl --map question=instruction,answer=output
"$BIN/sftdata" validate qa.jsonl
"$BIN/sftdata" pack qa.jsonl -o shards --tokenizer tiny --seq-len 256 --val-count 8
"$BIN/sftdata" inspect shards --row 0 > inspect.txt
grep -q '\[\[stop: <|im_end|>\]\]' inspect.txt
"$BIN/sftdata" stats shards
"$BIN/sfttrain" run shards -o train --model tiny --set max_steps=2 --set eval_steps=2 \
  --set save_steps=2 --set logging_steps=1
"$BIN/sfttrain" eval shards --model train/final
"$BIN/sfttrain" export train/final -o exported
"$BIN/sfttrain" export train/final --format gguf --quant q8_0 -o model-q8_0.gguf
"$BIN/sftdata" export qa.jsonl --format openai -o qa_openai.jsonl
"$BIN/python" - <<'PY'
import sftdata
assert "site-packages" in sftdata.__file__, sftdata.__file__  # the wheel, not the clone
print("wheel smoke test passed:", sftdata.__file__)
PY
