"""Baseline: the raw batch tokenizer on exactly the texts `sftdata pack` renders.

Run as its own process by bench_pack.py. Rendering is done before the clock starts; only the
batched fast-tokenizer call is timed. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("conversations", help="canonical JSONL (from sftdata convert)")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--template", default="llama2")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    from sftdata.conversation import read_jsonl
    from sftdata.render import Renderer
    from sftdata.tokenizer import load_tokenizer

    tok = load_tokenizer(a.tokenizer)
    renderer = Renderer(tok, template=a.template)
    # every sample a record gives (a template that re-renders history gives more than one)
    convs = list(read_jsonl(a.conversations))
    texts = [s.text for c in convs for s in renderer.render_record(c).samples]
    times = []
    tokens = 0
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        enc = tok(texts, add_special_tokens=False)
        times.append(time.perf_counter() - t0)
        tokens = sum(len(x) for x in enc["input_ids"])
        del enc
    times.sort()
    best = times[len(times) // 2]
    print(
        json.dumps(
            {
                "tool": "raw batch tokenizer (tok(texts), median of runs)",
                "records": len(convs),
                "samples": len(texts),
                "seconds": best,
                "tokens": tokens,
                "tokens_per_s": tokens / best,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


if __name__ == "__main__":
    main()
