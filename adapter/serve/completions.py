"""The HTTP server of a generation engine: OpenAI's completions API over continuous batching.

* ``POST /v1/completions`` — ``prompt`` (text, with the engine's bundled tokenizer, or token
  ids), ``max_tokens`` (16), ``temperature`` (1.0, OpenAI's default; 0 is greedy), ``top_p``,
  ``seed``, ``stop`` (strings, matched on the decoded text, or token ids) and ``stream``
  (server-sent events, one chunk per token, then ``data: [DONE]``). Each choice carries its
  ``token_ids`` beside its ``text`` (an engine without a tokenizer answers ids only).
* ``POST /v1/chat/completions`` — ``messages`` through the tokenizer's chat template (rendered
  in Jinja's sandbox), then as a completion; answers ``chat.completion`` (``message``) or, when
  streaming, ``chat.completion.chunk`` (``delta``).
* ``GET /health``, ``GET /metrics``: requests, waiting requests, active rows, batch rows per
  step, time to first token, inter-token latency, request latency, tokens generated,
  requests that ended because their client went away.

A client that disconnects mid-stream ends its request: its row is freed at the next step.
"""

from __future__ import annotations

__all__ = ["build_llm_app"]

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from adapter.llm.generate import Sampling
from adapter.serve.app import Refused, RequestMetrics, ServeOptions, guarded, read_json
from adapter.serve.continuous import Completion, QueueFull, TooLong
from adapter.serve.mixed import make_batcher


class _Metrics(RequestMetrics):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.waiting = Gauge("adapter_queue_depth", "Requests waiting for a row", registry=r)
        self.active = Gauge("adapter_active_rows", "Requests in the running batch", registry=r)
        self.rows = Histogram("adapter_batch_size", "Rows per decode step", registry=r, buckets=(1, 2, 4, 8, 16, 32))
        self.ttft = Histogram("adapter_time_to_first_token_seconds", "Arrival to first token", registry=r)
        self.itl = Histogram("adapter_inter_token_seconds", "Between two tokens of a request", registry=r,
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))  # fmt: skip
        self.tokens = Counter("adapter_generated_tokens", "Tokens generated", registry=r)
        self.disconnects = Counter("adapter_client_disconnects", "Requests ended because the client went away",
                                   registry=r)  # fmt: skip
        self.kv_usage = Gauge("adapter_kv_cache_usage_ratio", "Share of the paged KV cache's blocks held by "
                              "requests (paged engines; 0 otherwise)", registry=r)  # fmt: skip
        self.reused = Gauge("adapter_prefix_cache_reused_tokens", "Prompt tokens taken from the paged KV cache's "
                            "cached prefixes instead of computed, since the start", registry=r)  # fmt: skip


def _chat_template(engine) -> Any:
    """The bundled tokenizer's chat template (``chat_template.jinja`` or the config's
    ``chat_template``), compiled in Jinja's sandbox (a model folder's template is untrusted), or None."""
    name = engine.manifest.get("tokenizer")
    if not name:
        return None
    folder = engine.folder / name
    text = None
    if (folder / "chat_template.jinja").is_file():
        text = (folder / "chat_template.jinja").read_text()
    elif (folder / "tokenizer_config.json").is_file():
        with contextlib.suppress(OSError, ValueError):
            text = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    if not isinstance(text, str):
        return None
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(text)


def _ids(value: Any, what: str) -> list[int]:
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    raise Refused(400, f"'{what}' must be text or a non-empty list of token ids.")


def build_llm_app(engine, manifest: dict[str, Any], options: ServeOptions = ServeOptions(), rows: int = 8,
                  capacity: int | None = None, chunk: int | None = None, budget: int = 0, paged: bool | None = None) -> Starlette:  # fmt: skip
    """A Starlette app over a loaded ``LLMEngine`` whose session takes rows mid-batch (``slots``,
    or ``paged_slots``: see :func:`adapter.serve.mixed.make_batcher` for ``paged``)."""
    if paged and not hasattr(engine.session, "paged_slots"):
        raise Refused(501, f"The {engine.backend} generation session has no paged KV cache (OpenVINO engines have one).")
    if not hasattr(engine.session, "slots"):
        raise Refused(
            501, f"The {engine.backend} generation session cannot take requests into a running batch; "
            "continuous batching runs on ONNX Runtime and OpenVINO engines (convert with --backend onnxruntime or openvino)."
        )  # fmt: skip
    layout = engine.layout
    capacity = capacity or min(layout.max_positions, 2048)
    metrics = _Metrics()

    def on_step(active: int, waiting: int) -> None:
        metrics.active.set(active)
        metrics.waiting.set(waiting)
        metrics.rows.observe(active)

    batcher = make_batcher(engine.session, layout, rows, capacity, options.max_queue, on_step, chunk, budget, paged)
    slots = batcher.slots
    if getattr(slots, "mixed", False):  # read when scraped: current after a failure or an idle drop too
        metrics.kv_usage.set_function(lambda: 1 - slots.unused() / slots.blocks)
        metrics.reused.set_function(lambda: slots.reused)
    tokenizer = engine.tokenizer

    def encode(prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise Refused(400, "This engine carries no tokenizer: send token ids ('prompt': [1, 2, 3]).")
            return engine.encode([prompt])[0]
        return _ids(prompt, "prompt")

    def parse(data: Any) -> tuple[Completion, asyncio.Queue, list[str], bool]:
        if not isinstance(data, dict):
            raise Refused(400, "The body must be a JSON object.")
        prompt = encode(data.get("prompt"))
        bad = sorted({t for t in prompt if not 0 <= t < layout.vocab_size})
        if bad:
            raise Refused(400, f"Token ids {bad[:6]} are outside the vocabulary of {layout.vocab_size}.")
        try:
            max_tokens = int(data.get("max_tokens", 16))
            sampling = Sampling(float(data.get("temperature", 1.0)), 0, float(data.get("top_p", 1.0)),
                                None if data.get("seed") is None else int(data["seed"]))  # fmt: skip
        except (TypeError, ValueError) as exc:
            raise Refused(400, f"max_tokens, temperature, top_p and seed must be numbers: {exc}.") from exc
        if max_tokens < 1 or sampling.temperature < 0 or not 0 < sampling.top_p <= 1:
            raise Refused(400, "max_tokens must be at least 1, temperature at least 0, top_p in (0, 1].")
        stop = data.get("stop") or []
        stop = [stop] if isinstance(stop, (str, int)) else stop
        stop_ids = frozenset(s for s in stop if isinstance(s, int))
        stop_texts = [s for s in stop if isinstance(s, str)]
        if stop_texts and tokenizer is None:
            raise Refused(400, "Stop strings need the engine's tokenizer; give stop token ids.")
        loop = asyncio.get_running_loop()
        channel: asyncio.Queue = asyncio.Queue()
        request = Completion(prompt, max_tokens, sampling,
                             lambda token, reason: loop.call_soon_threadsafe(channel.put_nowait, (token, reason)),
                             stop_ids)  # fmt: skip
        return request, channel, stop_texts, bool(data.get("stream"))

    def submit(request: Completion) -> None:
        try:
            batcher.submit(request)
        except TooLong as exc:
            raise Refused(400, str(exc)) from exc
        except QueueFull as exc:
            raise Refused(429, f"The server is busy: {exc} Retry later.", "overloaded") from exc

    async def tokens_of(request: Completion, channel: asyncio.Queue, stop_texts: list[str]):
        """(token, finish reason) as the engine makes them, timed; a stop string ends the text."""
        last, seen = request.arrived, 0
        while True:
            token, reason = await channel.get()
            now = time.perf_counter()
            if token is not None:  # (request.tokens may be ahead: the engine thread appends to it)
                (metrics.ttft if seen == 0 else metrics.itl).observe(now - last)
                metrics.tokens.inc()
                last, seen = now, seen + 1
            if reason and reason.startswith("error"):
                raise Refused(500, reason, "engine_error")
            if stop_texts and token is not None:
                text = engine.decode(request.tokens) or ""
                if any(s in text for s in stop_texts):
                    request.cancelled = True
                    yield token, "stop"
                    return
            yield token, reason
            if reason:
                return

    def text_of(tokens: list[int], stop_texts: list[str]) -> str:
        text = (engine.decode(tokens) or "") if tokenizer is not None else ""
        for s in stop_texts:
            text = text.split(s)[0]
        return text

    template = _chat_template(engine)

    def chat_prompt(data: Any) -> dict[str, Any]:
        """The chat request as a completions request: its messages through the chat template."""
        if template is None:
            raise Refused(400, "This engine's tokenizer has no chat template; use /v1/completions.")
        messages = data.get("messages") if isinstance(data, dict) else None
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):  # fmt: skip
            raise Refused(400, "'messages' must be a non-empty list of {'role': ..., 'content': ...}.")
        try:
            text = template.render(messages=messages, add_generation_prompt=True, bos_token="", eos_token="")
        except Exception as exc:  # a template error is the model folder's, reported as one line
            raise Refused(400, f"The chat template failed on these messages: {exc}.") from exc
        return {**data, "prompt": text}

    async def chat(http: Request) -> Response:
        return await answer(chat_prompt(await read_json(http, options.max_body)), chat=True)

    async def completions(http: Request) -> Response:
        return await answer(await read_json(http, options.max_body), chat=False)

    async def answer(data: Any, chat: bool) -> Response:
        request, channel, stop_texts, stream = parse(data)
        submit(request)
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"

        def choice(text: str, tokens: list[int], reason: str | None, delta: bool) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text, "token_ids": tokens, "finish_reason": reason}
            key = "delta" if delta else "message"
            return {"index": 0, key: {"role": "assistant", "content": text}, "token_ids": tokens,
                    "finish_reason": reason}  # fmt: skip

        def envelope(item: dict[str, Any], delta: bool) -> dict[str, Any]:
            kind = ("chat.completion.chunk" if delta else "chat.completion") if chat else "text_completion"
            return {"id": cid, "object": kind, "created": int(time.time()),
                    "model": manifest.get("source", {}).get("spec", ""), "choices": [item]}  # fmt: skip

        if stream:

            async def events():
                finished = False
                try:
                    async for token, reason in tokens_of(request, channel, stop_texts):
                        delta = "" if tokenizer is None or token is None else engine.decode([token]) or ""
                        chunk = envelope(choice(delta, [] if token is None else [token], reason, True), True)
                        yield f"data: {json.dumps(chunk)}\n\n"
                    finished = True
                    yield "data: [DONE]\n\n"
                finally:
                    if not finished:  # the client went away: its row is freed at the next step
                        request.cancelled = True
                        metrics.disconnects.inc()

            return StreamingResponse(events(), media_type="text/event-stream")
        reason = None
        try:
            async for _token, finish in tokens_of(request, channel, stop_texts):
                reason = finish
        except asyncio.CancelledError:
            request.cancelled = True
            metrics.disconnects.inc()
            raise
        tokens = list(request.tokens)
        body = envelope(choice(text_of(tokens, stop_texts), tokens, reason, False), False)
        body["usage"] = {"prompt_tokens": len(request.prompt), "completion_tokens": len(tokens),
                         "total_tokens": len(request.prompt) + len(tokens)}  # fmt: skip
        return JSONResponse(body)

    async def health(_request: Request) -> Response:
        alive = batcher.thread.is_alive() and getattr(engine, "alive", True)  # a sharded engine's ranks
        body = {"status": "ok" if alive else "unavailable", "backend": engine.backend, "active": len(batcher.active),
                "waiting": batcher.waiting.qsize(), "engine_failures": batcher.failures}  # fmt: skip
        if batcher.last_error:
            body["last_error"] = batcher.last_error
        return JSONResponse(body, status_code=200 if alive else 503)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        batcher.stop()

    routes = [
        Route("/v1/completions", guarded("completions", completions, metrics), methods=["POST"]),
        Route("/v1/chat/completions", guarded("chat", chat, metrics), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics.endpoint, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.batcher, app.state.metrics = batcher, metrics
    return app
