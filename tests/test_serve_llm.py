"""``adapter serve`` of a generation engine on loopback: continuous batching answers 16
concurrent greedy completions exactly as offline ``generate``, streams the same tokens,
refuses bad requests with a 4xx and frees the row of a client that goes away."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest
from _loopback import Endings, LoopbackServer, run_batcher

from adapter.llm.convert import LLMOptions, convert_causal_lm
from adapter.llm.engine import LLMEngine
from adapter.llm.families import tiny_config, write_random_folder
from adapter.serve.app import ServeOptions
from adapter.serve.completions import build_llm_app


def _tiny_llama(tmp_path_factory, backend: str):
    root = tmp_path_factory.mktemp(f"serve-llm-{backend}")
    source = write_random_folder(tiny_config("llama"), root / "src")
    convert_causal_lm(str(source), root / "engine", LLMOptions(backend=backend, benchmark=False))
    return root / "engine"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _tiny_llama(tmp_path_factory, "onnxruntime")


@pytest.fixture(scope="module")
def llama_ov(tmp_path_factory):
    return _tiny_llama(tmp_path_factory, "openvino")


@pytest.fixture(scope="module")
def served(llama):
    engine = LLMEngine.load(llama)
    app = build_llm_app(engine, engine.manifest, ServeOptions(max_queue=64), rows=6, capacity=48)
    with LoopbackServer(app) as url:
        yield url, LLMEngine.load(llama), app


def _requests(vocab: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(0)
    return [(rng.integers(3, vocab, size=int(n)).tolist(), int(m))
            for n, m in zip(rng.integers(2, 20, size=16), rng.integers(4, 24, size=16))]  # fmt: skip


def test_sixteen_concurrent_greedy_completions_equal_offline_generate(served):
    url, offline, app = served
    asks = _requests(offline.layout.vocab_size)  # 16 requests over 6 rows: they join as others leave
    want = [offline.generate([p], max_new_tokens=m, stop_at_eos=True).tokens[0] for p, m in asks]

    async def ask():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*[client.post("/v1/completions", json={
                "prompt": p, "max_tokens": m, "temperature": 0}) for p, m in asks])  # fmt: skip

    answers = asyncio.run(ask())
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    got = [a.json()["choices"][0]["token_ids"] for a in answers]
    assert got == want
    for answer, (prompt, _m) in zip(answers, asks):
        usage = answer.json()["usage"]
        assert usage["prompt_tokens"] == len(prompt) and answer.json()["choices"][0]["finish_reason"] in (
            "stop",
            "length",
        )
    metrics = httpx.get(f"{url}/metrics").text
    assert 'adapter_requests_total{code="200",endpoint="completions"} 16.0' in metrics
    steps = [line for line in metrics.splitlines() if line.startswith("adapter_batch_size_sum")]
    count = [line for line in metrics.splitlines() if line.startswith("adapter_batch_size_count")]
    assert float(steps[0].split()[-1]) / float(count[0].split()[-1]) > 1.5  # steps ran several rows at once


def test_streaming_yields_the_same_tokens(served):
    url, offline, _ = served
    prompt, m = _requests(offline.layout.vocab_size)[3]
    want = offline.generate([prompt], max_new_tokens=m).tokens[0]
    tokens, done = [], False
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": m, "temperature": 0,
                                                             "stream": True}, timeout=60) as response:  # fmt: skip
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                tokens += json.loads(line[6:])["choices"][0]["token_ids"]
    assert done and tokens == want


def test_a_seeded_sample_repeats_offline(served):
    url, offline, _ = served
    from adapter.llm.generate import Sampling

    prompt = [5, 9, 17, 33]
    want = offline.generate([prompt], max_new_tokens=12, sampling=Sampling(0.8, 0, 0.9, 7)).tokens[0]
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0.8, "top_p": 0.9, "seed": 7}
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["token_ids"] == want


@pytest.mark.parametrize(("body", "status", "reason"), [
    (b"{nope", 400, "not valid JSON"),
    ({"prompt": "hello"}, 400, "no tokenizer"),
    ({"prompt": [1, 2, 999999]}, 400, "outside the vocabulary"),
    ({"prompt": [1, 2], "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": [1, 2], "temperature": "hot"}, 400, "numbers"),
    ({"prompt": list(range(3, 40)), "max_tokens": 20}, 400, "positions"),
])  # fmt: skip
def test_bad_requests_get_a_4xx_and_the_next_one_succeeds(served, body, status, reason):
    url, _, _ = served
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    answer = httpx.post(f"{url}/v1/completions", timeout=60, **kwargs)
    assert answer.status_code == status and reason in answer.json()["error"]["message"], answer.text
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": [4, 5], "max_tokens": 2, "temperature": 0}, timeout=60)
    assert ok.status_code == 200


@pytest.mark.parametrize("fixture,opener,call", [("llama", "slots", "decode"), ("llama_ov", "paged_slots", "step")])
def test_a_client_that_disconnects_mid_stream_frees_its_row(request, fixture, opener, call):
    """ONNX Runtime's rows, and OpenVINO's paged rows (whose blocks all go back)."""
    engine = LLMEngine.load(request.getfixturevalue(fixture))
    make = getattr(engine.session, opener)

    def slow_slots(rows, capacity):  # 20 ms per decode step: the client leaves long before the end
        slots = make(rows, capacity)
        step = getattr(slots, call)

        def slow(*args):
            time.sleep(0.02)
            return step(*args)

        setattr(slots, call, slow)
        return slots

    setattr(engine.session, opener, slow_slots)
    app = build_llm_app(engine, engine.manifest, ServeOptions(), rows=2, capacity=160)
    with LoopbackServer(app) as url:
        body = {"prompt": [4, 5, 6], "max_tokens": 150, "temperature": 0, "stream": True, "stop": [-1]}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    if opener == "paged_slots":  # its blocks show in the gauge while it runs
                        deadline = time.time() + 5
                        while "adapter_kv_cache_usage_ratio 0.0" in (text := httpx.get(f"{url}/metrics").text):
                            assert time.time() < deadline, text
                            time.sleep(0.02)
                    break  # leave after the first token
        left = time.time()
        while time.time() < left + 10 and app.state.batcher.active:
            time.sleep(0.02)
        # the row is free well before its 150 tokens (3 s of decode steps) would have been made
        assert not app.state.batcher.active and time.time() - left < 2.0
        if opener == "paged_slots":
            assert app.state.batcher.slots.unused() == 2 * -(-160 // app.state.batcher.slots.block)
        metrics = httpx.get(f"{url}/metrics").text
        assert "adapter_client_disconnects_total 1.0" in metrics
        done = httpx.post(f"{url}/v1/completions", json={"prompt": [4, 5], "max_tokens": 2, "temperature": 0},
                          timeout=60)  # fmt: skip
        assert done.status_code == 200
        if opener == "paged_slots":  # held blocks are gauged; none once the last request ended
            deadline = time.time() + 5
            while "adapter_kv_cache_usage_ratio 0.0" not in (text := httpx.get(f"{url}/metrics").text):
                assert time.time() < deadline, text
                time.sleep(0.05)


TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant{% endif %}"
)


@pytest.fixture(scope="module")
def worded(tmp_path_factory):
    """An engine with a bundled (word-level) tokenizer and a chat template: text in, text out."""
    from adapter.llm.families import write_word_tokenizer

    root = tmp_path_factory.mktemp("serve-words")
    source = write_random_folder(tiny_config("llama"), root / "src", seed=3)
    write_word_tokenizer(source, 128)
    (source / "chat_template.jinja").write_text(TEMPLATE)
    convert_causal_lm(str(source), root / "engine", LLMOptions(backend="onnxruntime", benchmark=False))
    engine = LLMEngine.load(root / "engine")
    with LoopbackServer(build_llm_app(engine, engine.manifest, ServeOptions(), rows=4, capacity=64)) as url:
        yield url, LLMEngine.load(root / "engine")


def test_text_prompts_stop_strings_and_chat_through_the_tokenizer(worded, served):
    url, offline = worded
    ids = offline.encode(["w5 w9 w17 w33"])[0]
    want = offline.generate([ids], max_new_tokens=10, stop_at_eos=True).tokens[0]
    answer = httpx.post(f"{url}/v1/completions", json={"prompt": "w5 w9 w17 w33", "max_tokens": 10,
                                                       "temperature": 0}, timeout=60).json()  # fmt: skip
    assert answer["choices"][0]["token_ids"] == want and answer["choices"][0]["text"] == offline.decode(want)
    words = offline.decode(want).split()
    if len(words) >= 3:  # a stop string cuts the text before it
        cut = httpx.post(f"{url}/v1/completions", json={"prompt": "w5 w9 w17 w33", "max_tokens": 10,
                                                        "temperature": 0, "stop": [words[2]]}, timeout=60).json()  # fmt: skip
        assert cut["choices"][0]["finish_reason"] == "stop" and words[2] not in cut["choices"][0]["text"]
    messages = [{"role": "user", "content": "w7 w8"}]
    prompt = offline.encode(["user w7 w8\nassistant"])[0]
    want = offline.generate([prompt], max_new_tokens=6).tokens[0]
    chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0},
                      timeout=60).json()  # fmt: skip
    assert chat["object"] == "chat.completion" and chat["choices"][0]["token_ids"] == want
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": offline.decode(want)}
    no_template = httpx.post(f"{served[0]}/v1/chat/completions", json={"messages": messages}, timeout=60)
    assert no_template.status_code == 400 and "chat template" in no_template.json()["error"]["message"]


@pytest.mark.parametrize("backend,chunk,budget,paged", [
    ("onnxruntime", 0, 0, False), ("onnxruntime", 1, 0, False), ("onnxruntime", 4, 0, False),
    ("openvino", 0, 0, False), ("openvino", 4, 0, False), ("openvino", 0, 1, False),
    ("openvino", 0, 0, True), ("openvino", 5, 0, True), ("openvino", 0, 1, True)])  # fmt: skip
def test_the_batcher_with_and_without_chunked_prefill_equals_offline(request, backend, chunk, budget, paged):
    """Requests joining 3 rows of 40 positions (shifts right for longer prompts, left at the
    capacity), their prompts prefilled whole or a few tokens between decode steps, or one prompt
    per step (budget 1). OpenVINO:
    rows leave through beam_idx, prompts are prefilled in a second infer request and join by
    rewriting the running state. OpenVINO paged: each step runs the running rows' tokens and
    the joining prompts' chunks (5 tokens a step, split across prompts) in one forward over
    block tables; every block is back in the free list at the end."""
    from adapter.llm.generate import Sampling
    from adapter.serve.continuous import Completion
    from adapter.serve.mixed import MixedBatcher, make_batcher

    engine = LLMEngine.load(request.getfixturevalue("llama" if backend == "onnxruntime" else "llama_ov"))
    assert engine.backend == backend
    asks = _requests(engine.layout.vocab_size)
    want = [engine.generate([p], max_new_tokens=m).tokens[0] for p, m in asks]
    endings = Endings(len(asks))
    batcher = make_batcher(engine.session, engine.layout, rows=3, capacity=40, chunk=chunk, budget=budget, paged=paged)
    assert isinstance(batcher, MixedBatcher) == paged
    requests = [Completion(p, m, Sampling(), endings.emit(i)) for i, (p, m) in enumerate(asks)]
    run_batcher(batcher, requests, endings, 60)
    assert [r.tokens for r in requests] == want
    assert set(endings.reasons.values()) <= {"stop", "length"}
    if paged:  # fewer steps than tokens: rows ran together; no block kept
        assert batcher.slots.steps < sum(len(t) for t in want)
        assert batcher.slots.unused() == batcher.slots.blocks == 3 * -(-40 // batcher.slots.block)
    elif backend == "openvino":  # every request joined a running state (none ran alone from the start)
        assert batcher.slots.joins >= len(asks) // 3


def test_an_engine_failure_ends_its_requests_and_the_next_ones_run(llama):
    """A decode step that raises (a device lost, a rank gone) ends the running requests with
    the error instead of stopping the engine thread; the next request runs from empty rows."""
    from adapter.llm.generate import Sampling
    from adapter.serve.continuous import Completion, ContinuousBatcher

    engine = LLMEngine.load(llama)
    batcher = ContinuousBatcher(engine.session, engine.layout, rows=2, capacity=40)
    real, calls = batcher.slots.decode, []

    def broken(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real(*args)

    batcher.slots.decode = broken
    endings = Endings(2)
    first = Completion([5, 6, 7], 8, Sampling(), endings.emit(0))
    batcher.start()
    try:
        batcher.submit(first)
        assert endings.wait(60, 0) and endings.reasons[0] == "error: device lost"
        second = Completion([5, 6, 7], 6, Sampling(), endings.emit(1))
        batcher.submit(second)
        assert endings.wait(60, 1) and endings.reasons[1] in ("stop", "length")
    finally:
        batcher.stop()
    assert second.tokens == engine.generate([[5, 6, 7]], max_new_tokens=6).tokens[0]
    assert batcher.failures == 1 and batcher.thread.is_alive() is False  # stopped by us, not by the error


def test_an_engine_that_cannot_page_is_served_with_rows_joining_between_steps(llama_ov):
    """A model attending over a sliding window shorter than the rows' capacity is not paged
    (the paged attention here sees the whole sequence): by default its rows join between
    steps instead, with the reason logged; asking for paging is refused with it."""
    import dataclasses

    from adapter.core.errors import AdapterError
    from adapter.serve.continuous import ContinuousBatcher
    from adapter.serve.mixed import MixedBatcher, make_batcher

    engine = LLMEngine.load(llama_ov)
    engine.session.layout = dataclasses.replace(engine.layout, sliding_window=16)
    batcher = make_batcher(engine.session, engine.layout, rows=2, capacity=40)
    assert type(batcher) is ContinuousBatcher and batcher.chunk == 0
    with pytest.raises(AdapterError, match="sliding window of 16 positions"):
        make_batcher(engine.session, engine.layout, rows=2, capacity=40, paged=True)
    assert isinstance(make_batcher(engine.session, engine.layout, rows=2, capacity=16), MixedBatcher)


def test_paged_rows_take_a_cached_prompt_prefix_and_answer_as_offline(llama_ov):
    """Prompts that share a 70-token prefix (a system prompt): once a row has computed it, the
    prompts after take its full blocks from the cache and compute only the rest; every answer
    equals offline generate, and every block is unused again at the end."""
    from adapter.llm.generate import Sampling
    from adapter.serve.continuous import Completion
    from adapter.serve.mixed import make_batcher

    engine = LLMEngine.load(llama_ov)
    vocab = engine.layout.vocab_size
    rng = np.random.default_rng(3)
    prefix = rng.integers(3, vocab, size=70).tolist()
    asks = [(prefix + rng.integers(3, vocab, size=n).tolist(), 6) for n in (3, 9, 5, 12)]
    want = [engine.generate([p], max_new_tokens=m).tokens[0] for p, m in asks]
    endings = Endings(len(asks))
    batcher = make_batcher(engine.session, engine.layout, rows=2, capacity=120, paged=True)
    requests = [Completion(p, m, Sampling(), endings.emit(i)) for i, (p, m) in enumerate(asks)]
    run_batcher(batcher, requests, endings, 60)
    assert [r.tokens for r in requests] == want
    slots = batcher.slots
    shared = 70 // slots.block * slots.block
    assert shared and slots.reused >= 2 * shared, (slots.reused, shared)  # the last two took the prefix's blocks
    assert slots.unused() == slots.blocks
