"""``adapter serve``: an engine behind an HTTP server (Starlette on uvicorn), loopback by default.

Registered on the main CLI (``COMMANDS``); errors are :class:`adapter.core.errors.AdapterError`
and reach ``adapter.cli.main.main``, which prints them as one paragraph.
"""

from __future__ import annotations

__all__ = ["serve"]

import logging
from pathlib import Path

import click

from adapter.cli.console import err
from adapter.converter.api import load
from adapter.core import artifact
from adapter.core.errors import AdapterError
from adapter.core.tokenizer import load_tokenizer, max_length
from adapter.llm.engine import LLMEngine, is_llm_artifact
from adapter.serve.app import Refused, ServeOptions, build_app
from adapter.serve.completions import build_llm_app
from adapter.serve.sharded import ShardedEngine, is_sharded_llm


@click.command("serve")
@click.argument("artifact_path", metavar="ARTIFACT", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (no authentication: keep it loopback unless a proxy guards it).")  # fmt: skip
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-batch", type=click.IntRange(1), default=8, show_default=True, help="Rows per engine run.")
@click.option("--max-wait-ms", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Forward-pass engines: how long the oldest request may wait for more to join its batch once a "
                   "stream is free (0: the batch closes then, with the requests that came while every stream was busy).")  # fmt: skip
@click.option("--max-queue", type=click.IntRange(1), default=64, show_default=True,
              help="Requests that may wait; more are refused with 429.")  # fmt: skip
@click.option("--max-body-mb", type=click.FloatRange(0, min_open=True), default=16.0, show_default=True)
@click.option("--capacity", type=click.IntRange(2), default=None,
              help="Generation: positions a request may use (prompt + new tokens); default min(model, 2048).")  # fmt: skip
@click.option("--prefill-chunk", type=click.IntRange(0), default=None,
              help="Generation: prompt tokens a step takes (paged: split across joining prompts; else prefilled this many "
                   "at a time between decode steps); 0: whole prompts. Default: 8 paged, else 0.")  # fmt: skip
@click.option("--prefill-budget", type=click.IntRange(0), default=0, show_default=True,
              help="Generation: prompt tokens admitted between two decode steps while requests run (0: no limit).")  # fmt: skip
@click.option("--paged/--no-paged", default=None,
              help="Generation on OpenVINO: a paged KV cache, each step running the rows' tokens and joining "
                   "prompts' chunks together (default where the engine has it; --no-paged: rows join between steps).")  # fmt: skip
@click.option("--bucket", type=click.IntRange(0), default=32, show_default=True,
              help="Forward-pass engines: batch only lengths rounding up to one multiple of N (0: pad to the longest).")  # fmt: skip
@click.option("--streams", type=click.IntRange(0), default=0, show_default=True,
              help="Forward-pass engines: batches run at once, the engine's threads split between them (0: the "
                   "runtime's choice for throughput; 1: one batch at a time).")  # fmt: skip
@click.option("--warmup-s", type=click.FloatRange(0), default=2.0, show_default=True,
              help="Forward-pass engines: seconds spent at start running the batch shapes to come, cheapest first.")  # fmt: skip
@click.option("--timeout", type=click.FloatRange(1), default=60.0, show_default=True,
              help="Sharded engines: seconds any wait between ranks may take.")  # fmt: skip
def serve(artifact_path, host, port, max_batch, max_wait_ms, max_queue, max_body_mb, capacity, prefill_chunk,
          prefill_budget, paged, bucket, streams, warmup_s, timeout):  # fmt: skip
    """Serve an engine ARTIFACT over HTTP.

    Forward-pass engines: /v1/embeddings and /v1/infer, batched dynamically (a batch closes
    when one of the engine's --streams is free, at --max-batch rows or once its oldest request
    waited --max-wait-ms; sequences padded to the top of their --bucket when the engine takes
    an attention mask; the bucketed shapes warmed for --warmup-s before listening).
    Generation engines: /v1/completions (OpenAI's API, streaming as server-sent events) over
    continuous batching (--max-batch rows join and leave at every step); a sharded
    generation artifact (`adapter shard`) runs on its ranks under torchrun. Both:
    /health and /metrics (Prometheus). SIGTERM stops accepting and finishes the requests in
    flight.

    \b
    Examples:
      adapter serve minilm-host --port 8000
      adapter serve llama-tp2 --max-batch 8   (a sharded artifact: 2 ranks under torchrun)
      curl -s localhost:8000/v1/embeddings -d '{"input": [[101, 7592, 102]]}'
      adapter serve qwen-host --max-batch 16 && curl -s localhost:8000/v1/completions -d '{"prompt": "Hi", "max_tokens": 8}'
    """
    manifest = artifact.validate(artifact_path)
    options = ServeOptions(max_batch, max_wait_ms, max_queue, int(max_body_mb * 2**20), bucket, streams, warmup_s)
    if is_sharded_llm(manifest):
        engine = ShardedEngine(artifact_path, manifest, timeout)
        err.print(f"starting {manifest['world_size']} ranks ({engine.backend})")
        try:
            try:
                app = build_llm_app(engine, manifest, options, rows=max_batch, capacity=capacity, chunk=prefill_chunk,
                                    budget=prefill_budget, paged=paged)  # fmt: skip
            except Refused as exc:
                raise AdapterError(str(exc), "Drop --paged: sharded engines serve with rows joining between steps.") from exc
            _run(app, artifact_path, host, port, max_batch, max_wait_ms)
        finally:
            engine.close()
        return
    if is_llm_artifact(manifest):
        try:
            app = build_llm_app(LLMEngine(artifact_path, manifest), manifest, options, rows=max_batch, capacity=capacity,
                                chunk=prefill_chunk, budget=prefill_budget, paged=paged)  # fmt: skip
        except Refused as exc:
            hint = ("Drop --paged: this engine serves with rows joining between steps." if paged else
                    "Convert the causal LM with --backend openvino or onnxruntime to serve it.")  # fmt: skip
            raise AdapterError(str(exc), hint) from exc
    else:
        folder = Path(artifact_path) / manifest["tokenizer"] if manifest.get("tokenizer") else None
        tokenizer = load_tokenizer(folder) if folder else None
        app = build_app(load(artifact_path, check=False), manifest, options, tokenizer,
                        max_length(folder) if folder else None)  # fmt: skip
    _run(app, artifact_path, host, port, max_batch, max_wait_ms)


class _Console(logging.Handler):
    """The server's information lines (its warm-up) on the CLI's stderr console; its warnings
    go on to the handlers above, as before."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING:
            err.print(record.getMessage(), markup=False, highlight=False)


def _run(app, artifact_path: Path, host: str, port: int, max_batch: int, max_wait_ms: float) -> None:
    import uvicorn

    logger = logging.getLogger("adapter.serve")
    if not any(isinstance(h, _Console) for h in logger.handlers):
        logger.addHandler(_Console())
    logger.setLevel(logging.INFO)

    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]listening on {host}: the server has no authentication[/]")
    runners = getattr(getattr(app.state, "batcher", None), "runners", None)
    streams = f", {len(runners)} at once" if runners else ""
    err.print(f"serving {artifact_path} on http://{host}:{port} (batches of up to {max_batch}, {max_wait_ms:g} ms{streams})")
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
