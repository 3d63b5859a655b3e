"""Helpers shared by the sfttrain tests: demo shards through the real pipeline, a small model folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from sftdata import IGNORE_INDEX
from sftdata.convert import convert
from sftdata.pack import PackOptions, pack
from sftdata.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO_CSV = ROOT / "fixtures" / "demo" / "qa.csv"


def demo_jsonl(folder: Path, *, limit: int | None = None) -> Path:
    """The demo Q&A CSV converted to canonical JSONL (optionally only the first ``limit`` records)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "demo.jsonl"
    convert([DEMO_CSV], out, mapping={"question": "instruction", "answer": "output"})
    if limit is not None:
        lines = out.read_text(encoding="utf-8").splitlines()[:limit]
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def demo_shards(
    folder: Path,
    *,
    seq_len: int = 64,
    packed: bool = True,
    val_count: int | None = None,
    limit: int | None = None,
) -> Path:
    """``sftdata pack --tokenizer tiny`` of the demo data into ``folder/shards``."""
    src = demo_jsonl(folder / "src", limit=limit)
    out = folder / "shards"
    pack(
        [src], out, PackOptions(seq_len=seq_len, tokenizer="tiny", pack=packed, val_count=val_count)
    )
    return out


def small_model_dir(folder: Path, *, seed: int = 0, max_positions: int = 512, **overrides) -> Path:
    """A hidden-64, 2-layer Llama with the tiny tokenizer (``overrides`` change any config
    field), saved as a local HF folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = load_tokenizer("tiny")
    fields = {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": max_positions,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": None,
    }
    cfg = LlamaConfig(**{**fields, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def metrics(run_dir: Path) -> list[dict]:
    """Parsed metrics.jsonl lines of a run."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> logged train loss."""
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def sfttrain_cmd(*args: str) -> list[str]:
    """Command line running the sfttrain CLI with this interpreter."""
    return [sys.executable, "-m", "sfttrain", *args]


def subprocess_env() -> dict[str, str]:
    """One thread per process, so CPU results do not depend on how many cores the run got."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``sfttrain ARGS`` to completion."""
    return subprocess.run(
        sfttrain_cmd(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=subprocess_env(),
        cwd=ROOT,
    )


# Tiny in-memory models and packed rows (C1 and model tests).
VOCAB = 97


def small_model(impl: str, seed: int = 0):
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).float().eval()


def packed_row(lengths: list[int], pad: int, seed: int = 1):
    """One packed row: records of `lengths` then `pad` padding tokens (its own segment)."""
    g = torch.Generator().manual_seed(seed)
    records = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    ids = torch.cat([*records, torch.zeros(pad, dtype=torch.long)])
    pos = torch.cat([torch.arange(n) for n in [*lengths, pad] if n])
    labels = ids.clone()
    start = 0
    for n in lengths:
        labels[start] = IGNORE_INDEX  # the first token of a record is never a target
        start += n
    labels[start:] = IGNORE_INDEX
    return records, ids[None], pos[None], labels[None]
