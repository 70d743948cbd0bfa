"""Load test of `adapter serve` for a generation engine: open-loop Poisson arrivals on loopback.

For each arrival rate, the same request set (random prompts of ``--prompt`` tokens, greedy,
``--max-tokens`` new tokens, streamed) is sent at Poisson arrival times, bounded in count
(``--requests``) and time (``--deadline`` seconds per run), against:

* **continuous**: ``adapter serve ENGINE --max-batch ROWS`` (requests join and leave the running
  batch at every decode step);
* **one at a time**: the same engine served with ``--max-batch 1`` (each request waits for
  the one before it to finish).

The two servers run as separate processes, one after the other and alternating order from
rate to rate (on 2 cores a server's threads slow whatever runs beside it). Client timestamps
give per request the time to first token (arrival to first streamed token) and the gaps
between its tokens; the table reports completed requests, throughput (generated tokens per
second of wall time), p50/p99 TTFT and inter-token latency, and refusals (429).

    python benchmarks/serve_load.py build/llm-engines/tinyllama-onnxruntime-int4 --rates 0.5,1,2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """``adapter serve`` in a process of its own, stopped with SIGTERM."""

    def __init__(self, engine: Path, rows: int, capacity: int, chunk: int = 0, extra: list[str] | None = None,
                 peer_python: str | None = None) -> None:  # fmt: skip
        self.port = _port()
        sizes = ["--capacity", str(capacity), "--prefill-chunk", str(chunk)] if capacity else []
        command = [sys.executable, "-m", "adapter.cli", "serve", str(engine), "--port", str(self.port), "--max-batch",
                   str(rows), "--max-queue", "1024", *sizes, *(extra or [])]  # fmt: skip
        if peer_python:  # the peer: OpenVINO GenAI's continuous batching in its own environment
            command = [peer_python, str(Path(__file__).with_name("_ov_genai_server.py")), str(engine), "--port",
                       str(self.port), "--max-seqs", str(rows), "--threads", str(os.cpu_count() or 1)]  # fmt: skip
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
            if self.proc.poll() is not None:
                raise RuntimeError(f"adapter serve exited: {self.proc.stderr.read().decode()[-800:]}")
        raise RuntimeError("adapter serve did not answer /health in 120 s")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def _one(client: httpx.AsyncClient, delay: float, prompt: list[int], max_tokens: int, deadline: float):
    await asyncio.sleep(delay)
    sent = time.perf_counter()
    times: list[float] = []
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return {"status": response.status_code}
            async for line in response.aiter_lines():
                if time.perf_counter() > deadline:
                    return {"status": "deadline", "times": times, "sent": sent}
                if line.startswith("data: ") and line != "data: [DONE]":
                    times += [time.perf_counter()] * len(json.loads(line[6:])["choices"][0]["token_ids"])
    except httpx.HTTPError as exc:
        return {"status": type(exc).__name__}
    return {"status": 200, "times": times, "sent": sent}


def scrape(url: str) -> dict[str, float]:
    """The server's ``GET /metrics`` through Prometheus' own text parser: sample name (with its
    labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        sample.name + "".join(f"{{{k}={v}}}" for k, v in sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metrics_match(url: str, result: dict) -> str:
    """Whether the server's counters equal the load test's own counts: answered requests,
    generated tokens, first tokens."""
    got = scrape(url)
    pairs = {
        "requests": (got.get("adapter_requests_total{code=200}{endpoint=completions}", 0.0), result["completed"]),
        "tokens": (got.get("adapter_generated_tokens_total", 0.0), result["tokens"]),
        "first tokens": (got.get("adapter_time_to_first_token_seconds_count", 0.0), result["completed"]),
    }
    wrong = [f"{k} {a:g} != {b:g}" for k, (a, b) in pairs.items() if a != b]
    return "yes" if not wrong else "no: " + ", ".join(wrong)


def run_load(url: str, rate: float, prompts: list[list[int]], max_tokens: int, seed: int, limit_s: float) -> dict:
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=len(prompts))
    arrivals = np.cumsum(gaps) - gaps[0]

    async def main():
        started = time.perf_counter()
        async with httpx.AsyncClient(base_url=url, timeout=limit_s + 60) as client:
            results = await asyncio.gather(*[_one(client, float(a), p, max_tokens, started + limit_s)
                                             for a, p in zip(arrivals, prompts)])  # fmt: skip
        return results, time.perf_counter() - started

    results, wall = asyncio.run(main())
    done = [r for r in results if r["status"] == 200 and r["times"]]
    ttft = [r["times"][0] - r["sent"] for r in done]
    itl = [b - a for r in done for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(len(r.get("times", [])) for r in results)
    pct = lambda xs, q: float(np.percentile(xs, q) * 1e3) if xs else float("nan")  # noqa: E731
    return {
        "rate": rate, "requests": len(prompts), "completed": len(done),
        "refused": sum(1 for r in results if r["status"] == 429), "wall_s": round(wall, 2),
        "tokens": tokens, "tokens_per_s": round(tokens / wall, 2), "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
        "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", type=Path, help="A generation engine artifact (OpenVINO, or ONNX Runtime with a shared KV cache).")
    parser.add_argument("--rates", default="0.5,1,2", help="Arrival rates, requests per second.")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--prompt", type=int, default=32, help="Prompt tokens per request.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rows", type=int, default=8, help="Rows of the continuous batch.")
    parser.add_argument("--deadline", type=float, default=300.0, help="Seconds a run may take.")
    parser.add_argument("--chunks", default="0", help="Prefill chunk sizes of the continuous server (0: whole).")
    parser.add_argument("--paged-chunks", default="",
                        help="Prefill chunk sizes (prompt tokens per step, 0: whole prompts) of paged servers "
                        "(OpenVINO: mixed prefill and decode steps over a paged KV cache).")
    parser.add_argument("--budgets", default="", help="Prefill budgets (prompt tokens between two decode steps) "
                        "of further continuous servers, whole prompts.")  # fmt: skip
    parser.add_argument("--peer", type=Path, default=None,
                        help="An OpenVINO GenAI model folder (optimum-intel export) served as the peer server.")
    parser.add_argument("--peer-python", default="build/ovgenai-venv/bin/python",
                        help="The Python of the environment with openvino-genai, starlette and uvicorn.")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    manifest = json.loads((args.engine / "manifest.json").read_text())
    vocab = manifest["layout"]["vocab_size"]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, vocab, size=args.prompt).tolist() for _ in range(args.requests)]
    capacity = args.prompt + args.max_tokens + 8
    modes = {"one at a time": (1, 0, 0, False)}
    for chunk in (int(c) for c in args.chunks.split(",") if c):
        modes["continuous" + (f", prefill chunk {chunk}" if chunk else "")] = (args.rows, chunk, 0, False)
    for budget in (int(b) for b in args.budgets.split(",") if b):
        modes[f"continuous, prefill budget {budget}"] = (args.rows, 0, budget, False)
    for chunk in (int(c) for c in args.paged_chunks.split(",") if c):
        modes["paged" + (f", {chunk} prompt tokens a step" if chunk else ", whole prompts")] = (args.rows, chunk, 0, True)
    if args.peer:
        modes["peer: OpenVINO GenAI ContinuousBatchingPipeline"] = (args.rows, -1, 0, False)
    rows: list[dict] = []
    for k, rate in enumerate(float(r) for r in args.rates.split(",")):
        order = list(modes.items()) if k % 2 == 0 else list(reversed(modes.items()))
        for name, (batch, chunk, budget, paged) in order:
            if chunk < 0:
                server = Server(args.peer, batch, 0, peer_python=args.peer_python)
            else:
                server = Server(args.engine, batch, capacity, chunk,
                                ["--prefill-budget", str(budget), "--paged" if paged else "--no-paged"])
            try:
                result = run_load(server.url, rate, prompts, args.max_tokens, seed=k, limit_s=args.deadline)
                result["metrics_match"] = metrics_match(server.url, result) if chunk >= 0 else "(no /metrics)"
            finally:
                server.stop()
            rows.append({"mode": name, "rows": batch, "chunk": chunk, **result})
    print(f"engine {args.engine} ({manifest['backend']['name']}, {manifest.get('weights')}); {args.requests} "
          f"requests of {args.prompt} prompt + {args.max_tokens} new tokens, greedy, streamed; Poisson arrivals")  # fmt: skip
    print("| rate req/s | mode | completed | refused | wall s | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms "
          "| ITL p99 ms | tokens/s vs one at a time | /metrics counts match |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["rate"] == row["rate"] and r["rows"] == 1)["tokens_per_s"] or float("nan")
        print(f"| {row['rate']:g} | {row['mode']} | {row['completed']}/{row['requests']} | {row['refused']} | "
              f"{row['wall_s']:.1f} | {row['tokens_per_s']:.1f} | {row['ttft_p50_ms']:.0f} | {row['ttft_p99_ms']:.0f} | "
              f"{row['itl_p50_ms']:.1f} | {row['itl_p99_ms']:.1f} | {row['tokens_per_s'] / base:.2f}x | "
              f"{row['metrics_match']} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
