"""The HTTP server of a forward-pass engine (Starlette on uvicorn): embeddings, named tensors,
health and Prometheus metrics.

* ``POST /v1/embeddings`` — OpenAI's request and response shapes. ``input`` is text (a
  string or a list of strings, through the tokenizer the artifact carries) or token ids (a
  list of ints, or a list of such lists): one embedding each. An input longer than the
  tokenizer's ``model_max_length`` is refused (400), not cut. Each input is one request of
  the dynamic batcher.
* ``POST /v1/infer`` — named tensors as JSON (``{"inputs": {name: nested lists}}``) or an
  ``.npz`` body (``Content-Type: application/x-npz``; read with ``allow_pickle=False``);
  the answer comes in the same format.
* ``GET /health``, ``GET /metrics`` (``prometheus-client``'s text format).

Bad input never reaches the engine: malformed JSON or ``.npz`` → 400, a body over
``max_body`` bytes → 413, inputs that do not match the engine's specs → 422, a full queue →
429; each with a one-line reason (``{"error": {"message", "type"}}``) and the server goes on.
"""

from __future__ import annotations

__all__ = [
    "Refused",
    "RequestMetrics",
    "ServeOptions",
    "build_app",
    "error_response",
    "guarded",
    "read_body",
    "read_json",
]

import asyncio
import contextlib
import io
import logging
import time
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapter.core.errors import AdapterError, InputMismatchError
from adapter.core.specs import TensorSpec, check_inputs
from adapter.core.tokenizer import encode_texts
from adapter.serve.batching import BatchStats, DynamicBatcher, Overloaded

NPZ = "application/x-npz"


class ArrayJSON(Response):
    """JSON written by orjson, numpy arrays as they are: a 384-float embedding in 5 us against
    159 us through ``json`` and Python floats (a float32 is written in its shortest form, which
    reads back to the same float32), which the event loop spends per request beside the engine.
    JSON has no NaN or infinity (orjson would write null): such an output is an engine error."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        if not _finite(content):
            raise AdapterError("The engine's output holds NaN or infinity, which JSON cannot carry; on /v1/infer, "
                               "ask for .npz (Accept: application/x-npz) to get the values as they are.")  # fmt: skip
        try:  # an array orjson does not write as it is (not contiguous, ...) goes as Python values
            return orjson.dumps(content, default=_as_list, option=orjson.OPT_SERIALIZE_NUMPY)
        except orjson.JSONEncodeError as exc:
            raise AdapterError(f"The engine's output cannot be written as JSON ({exc}); on /v1/infer, ask "
                               "for .npz (Accept: application/x-npz).") from exc  # fmt: skip


def _finite(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return value.dtype.kind not in "fc" or bool(np.isfinite(value).all())
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    return True


def _as_list(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


@dataclass(frozen=True)
class ServeOptions:
    max_batch: int = 8
    max_wait_ms: float = 0.0
    """How long the oldest request may wait for more to join its batch once a stream is free.
    0: a batch closes as soon as a stream is free, and the requests that arrived while every
    stream was busy share it. MiniLM on 2 cores (``benchmarks/serve_embed_load.py``): 480
    requests/s within p99 <= 50 ms in each of 3 runs, against 440-460 waiting 5 ms (p50 at
    200 req/s 5.9 against 11.4 ms)."""
    max_queue: int = 64
    max_body: int = 16 * 2**20
    bucket: int = 32
    """Forward-pass engines: N batches only lengths that round up to the same multiple of N; 0
    pads every batch to its longest request. MiniLM on a 2-core CPU under Poisson load
    (``benchmarks/serve_embed_load.py``): bucketing by 32 answers 107 requests/s at saturation
    where padding answers 77 (as many as one at a time, which needs no batching there)."""
    streams: int = 0
    """Forward-pass engines: batches that run at once (``EngineBase.streams``), the engine's
    threads split between them; 0 is the runtime's choice for throughput, 1 one batch at a time."""
    warmup_s: float = 2.0
    """Forward-pass engines: seconds spent at start running the shapes batches will take
    (``DynamicBatcher.warm``) before the server listens; 0: none."""


class Refused(Exception):
    """A request refused with ``status`` and a one-line reason."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


def error_response(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": " ".join(str(message).split())[:500], "type": kind}}, status_code=status)


class RequestMetrics:
    """A server's own registry with what every endpoint counts (see :func:`guarded`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("adapter_requests", "Requests by endpoint and status code", ["endpoint", "code"],
                                registry=self.registry)  # fmt: skip
        self.latency = Histogram("adapter_request_seconds", "Request latency (arrival to answer)", ["endpoint"],
                                 registry=self.registry)  # fmt: skip

    async def endpoint(self, _request: Request) -> Response:
        """``GET /metrics``: the registry in Prometheus' text format."""
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class _Metrics(RequestMetrics):
    def __init__(self) -> None:
        super().__init__()
        self.queue = Gauge("adapter_queue_depth", "Requests waiting for a batch", registry=self.registry)
        self.batch = Histogram("adapter_batch_size", "Rows per engine run", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64))  # fmt: skip
        self.engine = Histogram("adapter_engine_seconds", "Engine time per batch", registry=self.registry)


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused (413) past ``limit`` bytes, declared or sent."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"The body is {int(declared)} bytes; this server takes at most {limit}.")
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise Refused(413, f"The body is over {limit} bytes.")
    return data


async def read_json(request: Request, limit: int) -> Any:
    try:
        return orjson.loads(await read_body(request, limit))
    except orjson.JSONDecodeError as exc:
        raise Refused(400, f"The body is not valid JSON: {exc}.") from exc


def guarded(name: str, handler, metrics) -> Any:
    """``handler`` with bad input, overload and engine errors turned into one-line JSON errors,
    counted and timed in ``metrics`` (``requests``, ``latency``)."""

    async def wrapped(request: Request) -> Response:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except Refused as exc:
            response = error_response(exc.status, str(exc), exc.kind)
        except Overloaded as exc:
            response = error_response(429, f"The server is busy: {exc} Retry later.", "overloaded")
        except InputMismatchError as exc:
            response = error_response(422, str(exc))
        except AdapterError as exc:
            response = error_response(500, str(exc), "engine_error")
        metrics.requests.labels(name, str(response.status_code)).inc()
        metrics.latency.labels(name).observe(time.perf_counter() - started)
        return response

    return wrapped


def _embedding_output(outputs: list[TensorSpec]) -> str | None:
    """The engine's sentence embedding: ``sentence_embedding``, else its one 2-D float output."""
    names = [s.name for s in outputs]
    if "sentence_embedding" in names:
        return "sentence_embedding"
    flat = [s.name for s in outputs if len(s.shape) == 2 and s.dtype.startswith("float")]
    return flat[0] if len(flat) == 1 else None


def build_app(engine: Any, manifest: dict[str, Any], options: ServeOptions = ServeOptions(), tokenizer: Any = None,
              max_tokens: int | None = None) -> Starlette:  # fmt: skip
    """A Starlette app over a loaded forward-pass ``engine`` (``run``, ``inputs``, ``outputs``);
    ``tokenizer`` (see ``core.tokenizer``) takes text embeddings of up to ``max_tokens`` tokens."""
    metrics = _Metrics()
    stats = BatchStats(on_batch=lambda size, seconds: (metrics.batch.observe(size), metrics.engine.observe(seconds)),
                       on_queue=metrics.queue.set)  # fmt: skip
    batcher = DynamicBatcher(engine.streams(options.streams), engine.inputs, engine.outputs, options.max_batch, options.max_wait_ms,
                             options.max_queue, stats, options.bucket, max_tokens)  # fmt: skip
    specs = {s.name: s for s in engine.inputs}
    embedding = _embedding_output(engine.outputs)

    async def body(request: Request) -> bytes:
        return await read_body(request, options.max_body)

    async def json_body(request: Request) -> Any:
        return await read_json(request, options.max_body)

    def endpoint(name: str, handler):
        return guarded(name, handler, metrics)

    async def embeddings(request: Request) -> Response:
        data = await json_body(request)
        if embedding is None:
            raise Refused(400, "This engine has no sentence-embedding output (a 2-D float output); use /v1/infer.")
        inputs = data.get("input") if isinstance(data, dict) else None
        if isinstance(inputs, str):
            inputs = [inputs]
        if isinstance(inputs, list) and inputs and all(isinstance(t, str) for t in inputs):
            if tokenizer is None:
                raise Refused(400, "This engine carries no tokenizer: send token ids ('input': [[101, 2023, ...]]).")
            inputs = encode_texts(tokenizer, inputs)
        if isinstance(inputs, list) and inputs and all(isinstance(t, int) for t in inputs):
            inputs = [inputs]
        if not (isinstance(inputs, list) and inputs and all(isinstance(r, list) and r and
                                                            all(isinstance(t, int) for t in r) for r in inputs)):  # fmt: skip
            raise Refused(400, "'input' must be text or token ids: a string, a list of strings, a non-empty list "
                          "of ints, or a list of such lists.")  # fmt: skip
        longest = max(len(r) for r in inputs)
        if max_tokens and longest > max_tokens:
            raise Refused(400, f"An input has {longest} tokens; this model takes at most {max_tokens}.")
        results = []
        for row in inputs:
            ids = np.asarray([row], np.int64)
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            if "token_type_ids" in specs:
                feed["token_type_ids"] = np.zeros_like(ids)
            results.append(batcher.submit(check_inputs(engine.inputs, feed)))
        vectors = await asyncio.gather(*results)
        return ArrayJSON({
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": np.ascontiguousarray(v[embedding][0])}
                     for i, v in enumerate(vectors)],
            "model": manifest.get("source", {}).get("spec", ""),
            "usage": {"prompt_tokens": sum(len(r) for r in inputs), "total_tokens": sum(len(r) for r in inputs)},
        })  # fmt: skip

    async def infer(request: Request) -> Response:
        npz = request.headers.get("content-type", "").startswith(NPZ)
        if npz:
            raw = await body(request)
            try:
                with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
                    feed = {name: archive[name] for name in archive.files}
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
                raise Refused(400, f"The body is not a readable .npz: {exc}.") from exc
        else:
            data = await json_body(request)
            named = data.get("inputs") if isinstance(data, dict) else None
            if not isinstance(named, dict):
                raise Refused(400, "Send {'inputs': {name: nested lists}} or an .npz body.")
            feed = {}
            for name, value in named.items():
                spec = specs.get(name)
                try:
                    feed[name] = np.asarray(value, dtype=spec.dtype if spec else None)
                except (ValueError, TypeError) as exc:
                    raise Refused(422, f"Input '{name}' is not a numeric array: {exc}.") from exc
        outputs = await batcher.submit(check_inputs(engine.inputs, feed))
        if npz or NPZ in request.headers.get("accept", ""):
            buffer = io.BytesIO()
            np.savez(buffer, **outputs)
            return Response(buffer.getvalue(), media_type=NPZ)
        return ArrayJSON({"outputs": {name: np.ascontiguousarray(value) for name, value in outputs.items()}})

    async def health(_request: Request) -> Response:
        return JSONResponse({"status": "ok", "backend": manifest.get("backend", {}).get("name"),
                             "queue": batcher.depth})  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        if options.warmup_s > 0:
            started = time.perf_counter()
            done, total = await batcher.warm(options.warmup_s)
            logging.getLogger("adapter.serve").info(
                "warmed %d of %d batch shapes on %d stream(s) in %.1f s", done, total, len(batcher.runners),
                time.perf_counter() - started)  # fmt: skip
        yield
        await batcher.stop()

    routes = [
        Route("/v1/embeddings", endpoint("embeddings", embeddings), methods=["POST"]),
        Route("/v1/infer", endpoint("infer", infer), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics.endpoint, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.batcher, app.state.metrics = batcher, metrics
    return app
