"""Generation metrics on a shard split (``sfttrain eval --generate``, ``eval_generate: true``):
for each record, the model generates its last assistant turn from everything before it, and
BLEU-4 and ROUGE-1/2/L compare that with the reference — LLaMA-Efficient-Tuning's
``predict_with_generate`` with ``ComputeMetrics``.

Prompts and references come from the shards themselves, so they are exactly what training saw:
the prompt is the record's tokens up to its last trained run (the chat template's generation
prompt included), the reference that run without its stop token. Generation is batched (left
padding), greedy, and stops at the template's stop tokens.

Scores: text is segmented with ``jieba`` (words for Chinese, and split on spaces and punctuation
for English), as LLaMA-Factory does; ROUGE-1/2/L are ``rouge-score`` F-measures over those
tokens and BLEU-4 is ``sacrebleu``'s sentence BLEU over the same tokens (exponential smoothing),
each averaged over records and reported x100. LLaMA-Factory computes BLEU-4 with NLTK's
``sentence_bleu`` (smoothing method 3) and ROUGE with ``rouge-chinese``: ROUGE is the same
computation, BLEU differs in the smoothing only for short or disjoint answers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sftdata import IGNORE_INDEX
from sftdata.atomic import atomic_file
from sftdata.errors import ConfigError


def check_installed(what: str) -> None:
    """One line naming the extra when the scoring libraries are missing (before any work)."""
    import importlib.util

    missing = [
        m for m in ("sacrebleu", "rouge_score", "jieba") if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise ConfigError(
            f"{what}: needs {', '.join(missing)} for BLEU/ROUGE: pip install 'sftpipe[metrics]'"
        )


def check_eval_generate(config: Any, world_size: int) -> None:
    """``eval_generate`` needs the scoring libraries and one process (before any work)."""
    if not config.eval_generate:
        return
    check_installed("eval_generate")
    if world_size > 1:
        raise ConfigError(
            "eval_generate: runs on one process only; train on several and score the final "
            "model with `sfttrain eval SHARDS --generate`"
        )


@dataclass(frozen=True)
class Example:
    """One record's prompt and reference, taken from a packed row."""

    record_id: str
    prompt_ids: list[int]
    reference_ids: list[int]


def examples(reader: Any, stop_ids: set[int], *, limit: int | None = None) -> Iterator[Example]:
    """Every record of a split with a trained run: prompt = tokens before its last trained run,
    reference = that run without trailing stop tokens."""
    n = 0
    for i in range(len(reader)):
        row = reader[i]
        ids, labels = row["input_ids"], row["labels"]
        start = 0
        for length, rid in zip(row["seq_lens"].tolist(), row["record_ids"], strict=False):
            seg = slice(start, start + length)
            start += length
            trained = np.flatnonzero(labels[seg] != IGNORE_INDEX)
            if not len(trained):
                continue
            end = int(trained[-1]) + 1
            breaks = np.flatnonzero(np.diff(trained) > 1)
            first = int(trained[breaks[-1] + 1]) if len(breaks) else int(trained[0])
            rec = ids[seg].tolist()
            ref = rec[first:end]
            while ref and ref[-1] in stop_ids:
                ref.pop()
            yield Example(str(rid), rec[:first], ref)
            n += 1
            if limit is not None and n >= limit:
                return


def _segment(text: str) -> list[str]:
    import jieba

    jieba.setLogLevel(logging.WARNING)  # its dictionary-loading lines are not ours to print
    return [t for t in jieba.cut(text) if t.strip()]


def scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean BLEU-4 and ROUGE-1/2/L F (x100) over pairs, on jieba tokens (see the module doc)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    class _Tokens:
        def tokenize(self, text: str) -> list[str]:
            return _segment(text)

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_Tokens())
    out = {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    for pred, ref in zip(predictions, references, strict=True):
        p, r = " ".join(_segment(pred)), " ".join(_segment(ref))
        bleu = sacrebleu.sentence_bleu(p, [r], tokenize="none", smooth_method="exp")
        out["bleu-4"] += bleu.score
        rouge = scorer.score(ref, pred)
        for ours, theirs in (("rouge-1", "rouge1"), ("rouge-2", "rouge2"), ("rouge-l", "rougeL")):
            out[ours] += 100.0 * rouge[theirs].fmeasure
    n = max(len(predictions), 1)
    return {k: round(v / n, 4) for k, v in out.items()}


@torch.no_grad()
def predict(
    model: Any, tokenizer: Any, reader: Any, *, max_new_tokens: int = 128, batch_size: int = 8,
    limit: int | None = None, device: Any = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Greedy replies for the split's records: ``{"id", "prompt", "reference", "prediction"}``."""
    stops = list(reader.index.get("template", {}).get("stop_tokens") or [])
    stop_ids = {tokenizer.convert_tokens_to_ids(s) for s in stops} | {tokenizer.eos_token_id}
    stop_ids.discard(None)
    stop_ids.discard(tokenizer.unk_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    items = list(examples(reader, stop_ids, limit=limit))
    out = []
    for k in range(0, len(items), batch_size):
        batch = items[k : k + batch_size]
        width = max(len(e.prompt_ids) for e in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, e in enumerate(batch):  # left padding: every prompt ends where generation starts
            ids[j, width - len(e.prompt_ids) :] = torch.tensor(e.prompt_ids)
            mask[j, width - len(e.prompt_ids) :] = 1
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=sorted(stop_ids), pad_token_id=pad,
        )  # fmt: skip
        for j, e in enumerate(batch):
            new = [t for t in gen[j, width:].tolist() if t not in stop_ids and t != pad]
            out.append({
                "id": e.record_id,
                "prompt": tokenizer.decode(e.prompt_ids, skip_special_tokens=False),
                "reference": tokenizer.decode(e.reference_ids, skip_special_tokens=True).strip(),
                "prediction": tokenizer.decode(new, skip_special_tokens=True).strip(),
            })  # fmt: skip
    model.train(was_training)
    return out


PREDICTION_FILES = ("predictions.jsonl", "generate_metrics.json")
"""What :func:`write_predictions` writes in its folder."""


def write_predictions(rows: list[dict[str, Any]], metrics: dict[str, Any], folder: Path) -> None:
    """``folder/predictions.jsonl`` (one line per record) and ``folder/generate_metrics.json``."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / "predictions.jsonl") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with atomic_file(folder / "generate_metrics.json") as f:
        f.write(json.dumps(metrics, indent=2) + "\n")


LF_FILES = ("generated_predictions.jsonl", "predict_results.json")
"""What LLaMA-Factory's predict step writes in its output_dir (the predict step writes them too)."""


def predict_step(
    model_spec: str, *, adapter: str | None, shards: Path, split: str, output_dir: Path,
    max_new_tokens: int, batch_size: int,
) -> dict[str, Any]:  # fmt: skip
    """LLaMA-Factory's predict step (``do_predict`` + ``predict_with_generate``): every record of
    ``shards``' ``split`` gets its last reply generated and scored. Writes LF's files in
    ``output_dir`` (``generated_predictions.jsonl``: prompt, predict, label; ``predict_results.json``:
    ``predict_bleu-4`` ... and the runtime) and ours in ``output_dir/predict``; returns LF's
    results."""
    import time

    from sfttrain.data import check_compatible, open_split
    from sfttrain.distributed import default_device
    from sfttrain.model import load_for_inference

    reader = open_split(shards, split, verify="full")
    model, tokenizer = load_for_inference(model_spec, adapter=adapter)
    check_compatible(reader.index, tokenizer, model, shards_dir=reader.path, model_spec=model_spec)
    device = default_device()
    model.to(device)
    t0 = time.perf_counter()
    rows = predict(model, tokenizer, reader, max_new_tokens=max_new_tokens, batch_size=batch_size,
                   device=device)  # fmt: skip
    runtime = time.perf_counter() - t0
    got = scores([r["prediction"] for r in rows], [r["reference"] for r in rows])
    write_predictions(rows, {**got, "predicted": len(rows)}, output_dir / "predict")
    results = {f"predict_{k}": v for k, v in got.items()}
    results |= {"predict_samples": len(rows), "predict_runtime": round(runtime, 4),
                "predict_samples_per_second": round(len(rows) / max(runtime, 1e-9), 3)}  # fmt: skip
    lf_rows, lf_results = LF_FILES
    with atomic_file(output_dir / lf_rows) as f:
        f.writelines(
            json.dumps({"prompt": r["prompt"], "predict": r["prediction"], "label": r["reference"]},
                       ensure_ascii=False) + "\n"
            for r in rows
        )  # fmt: skip
    with atomic_file(output_dir / lf_results) as f:
        f.write(json.dumps(results, indent=2) + "\n")
    return results


def generation_metrics(
    model: Any, tokenizer: Any, reader: Any, *, folder: Path, max_new_tokens: int,
    batch_size: int,
) -> dict[str, float]:  # fmt: skip
    """``eval_generate`` during training: predict the split, write ``folder``, return the scores
    as ``eval_bleu-4``, ``eval_rouge-1`` ... for the evaluation's metrics row."""
    rows = predict(model, tokenizer, reader, max_new_tokens=max_new_tokens, batch_size=batch_size)
    got = scores([r["prediction"] for r in rows], [r["reference"] for r in rows])
    write_predictions(rows, {**got, "predicted": len(rows)}, folder)
    return {f"eval_{k}": v for k, v in got.items()}


__all__ = [
    "LF_FILES",
    "PREDICTION_FILES",
    "Example",
    "check_eval_generate",
    "check_installed",
    "examples",
    "generation_metrics",
    "predict",
    "predict_step",
    "scores",
    "write_predictions",
]
