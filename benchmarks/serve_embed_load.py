"""Load test of `adapter serve` for a forward-pass engine: dynamic batching against one at a time.

Open-loop Poisson arrivals of ``/v1/embeddings`` requests (token ids of random lengths between
``--min-len`` and ``--max-len``) at several rates against the same engine served in several
modes, each in a process of its own, the order rotating from rate to rate (``--modes``):

* **one at a time**: ``--max-batch 1 --streams 1``, padded to the bucket (a runtime that
  prepares its kernels per shape runs a shape it has seen faster: MiniLM on OpenVINO 194 ->
  228 req/s); the baseline;
* **batched**: the server's defaults: batches of up to ``--max-batch`` of one ``--bucket``,
  as many running at once as the runtime's throughput choice of streams;
* **batched on one stream**: the same batches, one at a time (``--streams 1``);
* **streams without batching**: one request per run, on the streams (what streams alone give);
* **padded**: batches padded to their longest request (``--bucket 0``).

Reports per rate and mode the answered requests/s, p50/p99 latency (arrival to answer), the
mean rows per engine run, the client's CPU and whether /metrics counts what the client saw;
then per mode the **capacity under the latency objective**: the highest offered rate at which
every request was answered with p99 <= ``--slo-ms``, against one at a time's.

    python benchmarks/serve_embed_load.py ENGINE --rates 100,200,300,400,500
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



MODES = {  # name: (max batch, bucket, streams); None: the command line's value
    "one at a time": (1, None, 1),
    "batched": (None, None, 0),
    "batched on one stream": (None, None, 1),
    "streams without batching": (1, None, 0),
    "padded": (None, 0, 0),
}


def capacity(results: list[dict], mode: str, slo_ms: float) -> tuple[float, float | None]:
    """``mode``'s capacity under the objective: the highest rate at which it, and every lower
    rate tried, answered every request with p99 within ``slo_ms`` in every repeat (0: none),
    and the lowest rate that missed (None: none did, so the capacity is at least the first)."""

    def held(rate: float) -> bool:
        return all(r["completed"] == r["requests"] and r["p99_ms"] is not None and r["p99_ms"] <= slo_ms
                   for r in results if r["mode"] == mode and r["rate"] == rate)  # fmt: skip

    rates = sorted({r["rate"] for r in results if r["mode"] == mode})
    missed = next((rate for rate in rates if not held(rate)), None)
    return max((rate for rate in rates if missed is None or rate < missed), default=0.0), missed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", type=Path)
    parser.add_argument("--rates", default="50,100,200")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--min-len", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--bucket", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=0.0)
    parser.add_argument("--modes", default="one at a time,batched,batched on one stream,streams without batching",
                        help=f"comma-separated, from: {', '.join(MODES)}")  # fmt: skip
    parser.add_argument("--rates-for", action="append", default=[], metavar="MODE=R1,R2",
                        help="rates for one mode instead of --rates (repeatable)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1, help="runs per rate and mode (capacity needs every one)")
    parser.add_argument("--slo-ms", type=float, default=50.0, help="the p99 latency objective")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.modes.split(",")]
    unknown = [m for m in names if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    rng = np.random.default_rng(0)
    rows = [[101, *rng.integers(1000, 30000, int(n) - 2).tolist(), 102]
            for n in rng.integers(args.min_len, args.max_len + 1, args.requests)]  # fmt: skip
    own = dict(item.split("=", 1) for item in args.rates_for)
    if set(own) - set(names):
        parser.error(f"--rates-for names modes not run: {sorted(set(own) - set(names))}; --modes is {names}")
    plan = {name: [float(r) for r in own.get(name, args.rates).split(",")] for name in names}
    steps = max(len(rates) for rates in plan.values())
    results = []
    for k in range(steps * args.repeats):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            if k % steps >= len(plan[name]):
                continue
            rate = plan[name][k % steps]
            batch, bucket, streams = MODES[name]
            batch = args.max_batch if batch is None else batch
            bucket = args.bucket if bucket is None else bucket
            server = Server(args.engine, batch, 0,
                            extra=["--bucket", str(bucket), "--max-wait-ms", f"{args.max_wait_ms:g}", "--streams", str(streams)])  # fmt: skip
            try:
                result = run_load(server.url, rate, rows, seed=k)
                got = scrape(server.url)  # Prometheus' parser: answered requests, and rows over all engine runs
                counts = (
                    got.get("adapter_requests_total{code=200}{endpoint=embeddings}"),
                    got.get("adapter_batch_size_sum"),
                )
                result["metrics_match"] = "yes" if counts == (result["completed"],) * 2 else f"no: {counts}"
                result["rows_per_run"] = round((counts[1] or 0) / max(1.0, got.get("adapter_batch_size_count") or 1), 2)
                results.append({"mode": name, "repeat": k // steps, **result})
            finally:
                server.stop()
    print(f"engine {args.engine}; {args.requests} embedding requests of {args.min_len}-{args.max_len} tokens, "
          f"Poisson arrivals; batches of up to {args.max_batch} of one bucket of {args.bucket}, {args.max_wait_ms:g} ms wait")  # fmt: skip
    print("| rate req/s | mode | completed | answered/s | vs one at a time | p50 ms | p99 ms | rows per run | "
          "client CPU s | /metrics counts match |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(results, key=lambda x: (names.index(x["mode"]), x["rate"], x["repeat"])):
        alone = next((x["per_s"] for x in results if x["rate"] == r["rate"] and x["mode"] == "one at a time"
                      and x["repeat"] == r["repeat"]), None)  # fmt: skip
        ratio = f"{r['per_s'] / alone:.2f}x" if alone else "-"
        print(f"| {r['rate']:g} | {r['mode']} | {r['completed']}/{r['requests']} | {r['per_s']:.1f} | {ratio} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['rows_per_run']} | {r['client_cpu_s']:.2f} | "
              f"{r['metrics_match']} |")  # fmt: skip
    print(f"\ncapacity at p99 <= {args.slo_ms:g} ms: the highest rate at which it and every lower rate tried answered "
          "every request within the objective in every repeat")  # fmt: skip
    caps = {name: capacity(results, name, args.slo_ms) for name in names}
    base, base_missed = caps.get("one at a time", (0.0, None))
    for name, (held, missed) in caps.items():
        line = f"{held:g} req/s" + (f" ({missed:g} missed)" if missed is not None else " (or more: no rate tried missed)")
        if base and held and name != "one at a time":
            line += f"; {held / base:.2f}x one at a time's {base:g}"
            if base_missed:  # one at a time's own capacity lies below the rate it missed
                line += f" (>= {held / base_missed:.2f}x its missed {base_missed:g})"
        print(f"  {name}: {line}")
    if args.json:
        caps_json = {n: {"held": c[0], "missed": c[1]} for n, c in caps.items()}
        args.json.write_text(json.dumps({"rows": results, "slo_ms": args.slo_ms, "capacity": caps_json}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
