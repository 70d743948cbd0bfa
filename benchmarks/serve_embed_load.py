"""Load test of `adapter serve` for a forward-pass engine: padded batches, bucketed batches, one at a time.

Open-loop Poisson arrivals of ``/v1/embeddings`` requests (token ids of random lengths between
``--min-len`` and ``--max-len``) at several rates against the same engine served three ways,
each in a process of its own, the order rotating from rate to rate:

* **padded**: batches of up to ``--max-batch`` padded to their longest request;
* **bucketed**: only lengths that round up to one multiple of ``--bucket`` share a batch;
* **one at a time**: ``--max-batch 1``.

Reports completed requests, throughput and p50/p99 latency (arrival to answer).

    python benchmarks/serve_embed_load.py ENGINE --rates 50,100,200
    (ENGINE: e.g. ``adapter convert adapter.zoo:minilm --backend onnxruntime --precision fp32 -o minilm-ort``)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from serve_load import Server, scrape


async def _one(client: httpx.AsyncClient, delay: float, ids: list[int]) -> tuple[int, float]:
    await asyncio.sleep(delay)
    sent = time.perf_counter()
    try:
        response = await client.post("/v1/embeddings", json={"input": [ids]})
    except httpx.HTTPError:
        return -1, 0.0
    return response.status_code, time.perf_counter() - sent


def run_load(url: str, rate: float, rows: list[list[int]], seed: int) -> dict:
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=len(rows))
    arrivals = np.cumsum(gaps) - gaps[0]

    async def main():
        started = time.perf_counter()
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            results = await asyncio.gather(*[_one(client, float(a), r) for a, r in zip(arrivals, rows)])
        return results, time.perf_counter() - started

    results, wall = asyncio.run(main())
    ok = [t for code, t in results if code == 200]
    return {"rate": rate, "requests": len(rows), "completed": len(ok), "wall_s": round(wall, 2),
            "per_s": round(len(ok) / wall, 1), "p50_ms": float(np.percentile(ok, 50) * 1e3) if ok else None,
            "p99_ms": float(np.percentile(ok, 99) * 1e3) if ok else None}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", type=Path)
    parser.add_argument("--rates", default="50,100,200")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--min-len", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--bucket", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = [[101, *rng.integers(1000, 30000, int(n) - 2).tolist(), 102]
            for n in rng.integers(args.min_len, args.max_len + 1, args.requests)]  # fmt: skip
    modes = [("padded", args.max_batch, 0), (f"bucketed by {args.bucket}", args.max_batch, args.bucket),
             ("one at a time", 1, 0)]  # fmt: skip
    results = []
    for k, rate in enumerate(float(r) for r in args.rates.split(",")):
        for name, batch, bucket in modes[k % 3 :] + modes[: k % 3]:
            server = Server(args.engine, batch, 0, extra=["--bucket", str(bucket), "--max-wait-ms", "5"])
            try:
                result = run_load(server.url, rate, rows, seed=k)
                got = scrape(server.url)  # Prometheus' parser: answered requests, and rows over all engine runs
                counts = (
                    got.get("adapter_requests_total{code=200}{endpoint=embeddings}"),
                    got.get("adapter_batch_size_sum"),
                )
                result["metrics_match"] = "yes" if counts == (result["completed"],) * 2 else f"no: {counts}"
                results.append({"mode": name, **result})
            finally:
                server.stop()
    print(f"engine {args.engine}; {args.requests} embedding requests of {args.min_len}-{args.max_len} tokens, "
          f"Poisson arrivals; batches of up to {args.max_batch}, 5 ms wait")  # fmt: skip
    print("| rate req/s | mode | completed | answered/s | p50 ms | p99 ms | /metrics counts match |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rate']:g} | {r['mode']} | {r['completed']}/{r['requests']} | {r['per_s']:.1f} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['metrics_match']} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
