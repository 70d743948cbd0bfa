"""Load test of `adapter serve` for a forward-pass engine: padded batches, bucketed batches, one at a time.

Open-loop Poisson arrivals of ``/v1/embeddings`` requests (token ids of random lengths between
``--min-len`` and ``--max-len``) at several rates against the same engine served three ways,
each in a process of its own, the order rotating from rate to rate:

* **padded**: batches of up to ``--max-batch`` padded to their longest request;
* **bucketed**: only lengths that round up to one multiple of ``--bucket`` share a batch;
* **one at a time**: ``--max-batch 1``, padded to the bucket as well (a runtime that prepares
  its kernels per shape runs a shape it has seen faster: MiniLM on OpenVINO 194 -> 228 req/s).

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

import aiohttp
import numpy as np
from serve_load import Server, scrape


async def _one(session: aiohttp.ClientSession, delay: float, ids: list[int]) -> tuple[int, float]:
    await asyncio.sleep(delay)
    sent = time.perf_counter()
    try:
        async with session.post("/v1/embeddings", json={"input": [ids]}) as response:
            await response.read()
            code = response.status
    except aiohttp.ClientError:
        return -1, 0.0
    return code, time.perf_counter() - sent


def run_load(url: str, rate: float, rows: list[list[int]], seed: int) -> dict:
    """Open-loop arrivals from aiohttp (httpx, with hundreds of requests in flight, spent ~12 ms
    of CPU per request here: a core of the 2 the server runs on); the client's CPU seconds are
    reported beside the figures."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=len(rows))
    arrivals = np.cumsum(gaps) - gaps[0]

    async def main():
        started = time.perf_counter()
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(300)) as session:
            results = await asyncio.gather(*[_one(session, float(a), r) for a, r in zip(arrivals, rows)])
        return results, time.perf_counter() - started

    cpu = time.process_time()
    results, wall = asyncio.run(main())
    ok = [t for code, t in results if code == 200]
    return {"rate": rate, "requests": len(rows), "completed": len(ok), "wall_s": round(wall, 2),
            "per_s": round(len(ok) / wall, 1), "p50_ms": float(np.percentile(ok, 50) * 1e3) if ok else None,
            "p99_ms": float(np.percentile(ok, 99) * 1e3) if ok else None,
            "client_cpu_s": round(time.process_time() - cpu, 2)}  # fmt: skip



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
             ("one at a time", 1, args.bucket)]  # fmt: skip
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
    print("| rate req/s | mode | completed | answered/s | vs one at a time | p50 ms | p99 ms | client CPU s | /metrics counts match |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        alone = next(x for x in results if x["rate"] == r["rate"] and x["mode"] == "one at a time")["per_s"]
        print(f"| {r['rate']:g} | {r['mode']} | {r['completed']}/{r['requests']} | {r['per_s']:.1f} | "
              f"{r['per_s'] / alone:.2f}x | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['client_cpu_s']:.2f} | "
              f"{r['metrics_match']} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
