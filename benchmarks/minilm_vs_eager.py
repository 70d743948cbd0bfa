"""MiniLM: adapter's engine against eager PyTorch, measured in one run on this machine.

    python benchmarks/minilm_vs_eager.py [--batches 1,8] [--seq 128] [--json out.json]

Converts the bundled all-MiniLM-L6-v2 to the host profile (cached after the first run),
then times eager PyTorch FP32 and the engine on the same inputs (warm-up, then the
median of repeated runs) and reports the ratio. The wider peer comparison (torch.compile,
OpenVINO, ...) belongs to the fusion issue's benchmark.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from adapter.core.timing import median_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("-o", "--output", type=Path, default=Path("build/bench-minilm-host"))
    args = parser.parse_args()

    from adapter import ConvertOptions, convert, load
    from adapter.zoo import minilm

    start = time.perf_counter()
    result = convert("adapter.zoo:minilm", args.output, ConvertOptions(benchmark=False))
    convert_s = time.perf_counter() - start
    engine = load(args.output)
    module, _, _ = minilm()
    torch.set_num_threads(engine.config["threads"])
    rng = np.random.default_rng(0)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        ids = rng.integers(1000, 29000, (batch, args.seq), dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        tensors = {k: torch.from_numpy(v) for k, v in feed.items()}
        with torch.inference_mode():
            eager_ms = median_ms(lambda t=tensors: module(**t), warmup=5, repeats=args.repeats, budget_s=120)
            want = module(**tensors)["token_embeddings"].numpy()
        engine_ms = median_ms(lambda f=feed: engine.run(f), warmup=5, repeats=args.repeats, budget_s=120)
        got = engine.run(feed)["token_embeddings"]
        cos = np.sum(got * want, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
        rows.append(
            {
                "batch": batch,
                "seq": args.seq,
                "eager_ms": eager_ms,
                "engine_ms": engine_ms,
                "speedup_vs_eager": eager_ms / engine_ms,
                "token_cosine_min": float(cos.min()),
                "max_abs": float(np.abs(got - want).max()),
            }
        )
    report = {
        "convert_seconds": convert_s,
        "cache_hit": result.cache_hit,
        "threads": engine.config["threads"],
        "backend": result.manifest["backend"]["name"] + " " + result.manifest["backend"]["version"],
        "rows": rows,
    }
    print(
        f"convert: {convert_s:.2f} s ({'cache hit' if result.cache_hit else 'built'}), {report['backend']}, {report['threads']} threads"
    )
    print(f"{'batch':>5} {'seq':>4} {'eager ms':>9} {'engine ms':>10} {'speedup':>8} {'min cos':>10} {'max-abs':>9}")
    for r in rows:
        print(
            f"{r['batch']:>5} {r['seq']:>4} {r['eager_ms']:>9.2f} {r['engine_ms']:>10.2f} {r['speedup_vs_eager']:>7.2f}x {r['token_cosine_min']:>10.7f} {r['max_abs']:>9.2e}"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
