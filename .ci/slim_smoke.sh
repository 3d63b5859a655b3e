#!/usr/bin/env bash
# The slim install (issue 25): `pip install sftpipe` is the data half. Build the wheel, install it
# alone (no extras, no torch first) into a fresh virtual environment, and run convert -> validate
# -> pack -> inspect -> stats -> export from a folder outside the clone; torch must not be there
# (so nothing the data half ran imported it), and sfttrain must stop in one line naming the
# extra. Usage: .ci/slim_smoke.sh [WORKDIR]   (default: a new temporary folder)
set -euo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$(mktemp -d)}"
mkdir -p "$WORK"
cd "$WORK"
python3 -m venv slim
slim/bin/pip install -q --upgrade pip
"$SRC/.venv/bin/pip" wheel -q --no-deps -w dist "$SRC"
slim/bin/pip install -q dist/sftpipe-*.whl
BIN="$WORK/slim/bin"
export SFTPIPE_CACHE="$WORK/cache"
"$BIN/python" - <<'PY'
import importlib.util
for absent in ("torch", "peft", "fastchat", "datasets", "matplotlib"):  # datasets: not needed
    assert importlib.util.find_spec(absent) is None, f"{absent} is in the slim install"
PY
mkdir -p run && cd run  # outside the clone: the clone's files are only read as input data
cp "$SRC/fixtures/demo/qa.csv" qa.csv
"$BIN/sftdata" convert qa.csv -o qa.jsonl --map question=instruction,answer=output
"$BIN/sftdata" validate qa.jsonl --tokenizer tiny
# --json: the summary stays off stderr, so anything there is a warning (no-torch advisories)
"$BIN/sftdata" pack qa.jsonl -o shards --tokenizer tiny --seq-len 256 --val-count 8 --json > pack.json 2> pack.err
if [ -s pack.err ]; then cat pack.err; echo "pack wrote to stderr in the slim install"; exit 1; fi
"$BIN/python" -c "import json, sys; assert json.load(open('pack.json'))['rows'] > 0"
"$BIN/sftdata" inspect shards --row 0 > inspect.txt
grep -q '\[\[stop: <|im_end|>\]\]' inspect.txt
"$BIN/sftdata" stats shards
"$BIN/sftdata" export qa.jsonl --format sharegpt -o qa_sharegpt.json
if "$BIN/sfttrain" run shards --model tiny -o train 2> train.err; then
  echo "sfttrain ran without the train extra"; exit 1
fi
grep -q "pip install 'sftpipe\[train\]'" train.err
[ "$(wc -l < train.err)" -eq 1 ]
echo "slim install smoke test passed: $(du -sm "$WORK/slim" | cut -f1) MB"
