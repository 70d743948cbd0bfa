"""``adapter serve`` of a sharded decoder: the batcher runs in the server, the model on its
ranks under torchrun (``adapter.llm.rank_serve``). Concurrent greedy completions over TP2,
and PP2 artifacts equal the unsharded engine's offline ``generate`` token for
token, with requests joining and leaving the running rows (and prompts prefilled in chunks);
text prompts go through the tokenizer the sharded artifact bundles."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from _loopback import Endings, LoopbackServer, run_batcher

from adapter.core import artifact
from adapter.llm.convert import LLMOptions, convert_causal_lm
from adapter.llm.engine import LLMEngine
from adapter.llm.families import tiny_config, write_random_folder, write_word_tokenizer
from adapter.llm.generate import Sampling
from adapter.llm.sharded import build_sharded_llm
from adapter.serve.app import ServeOptions
from adapter.serve.completions import build_llm_app
from adapter.serve.continuous import Completion, ContinuousBatcher
from adapter.serve.sharded import ShardedEngine


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-sharded")
    folder = write_random_folder(tiny_config("llama"), root / "src")
    write_word_tokenizer(folder, 128)  # the sharded artifact bundles it: text prompts in, text out
    convert_causal_lm(str(folder), root / "whole", LLMOptions(backend="onnxruntime", benchmark=False))
    return root, folder, LLMEngine.load(root / "whole")


def _sharded(source, tp: int, pp: int):
    root, folder, _ = source
    out = root / f"tp{tp}-pp{pp}"
    if not out.exists():
        build_sharded_llm(str(folder), out, tp=tp, pp=pp, verify=False)
    return out


def _asks(vocab: int, count: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(1)
    return [(rng.integers(3, vocab, size=int(n)).tolist(), int(m))
            for n, m in zip(rng.integers(2, 18, size=count), rng.integers(3, 16, size=count))]  # fmt: skip


def test_concurrent_completions_over_tp2_equal_the_unsharded_engine(source):
    whole = source[2]
    folder = _sharded(source, 2, 1)
    engine = ShardedEngine(folder, artifact.read_manifest(folder))
    asks = _asks(whole.layout.vocab_size, 10)
    want = [whole.generate([p], max_new_tokens=m).tokens[0] for p, m in asks]
    try:
        app = build_llm_app(engine, engine.manifest, ServeOptions(max_queue=32), rows=4, capacity=40)
        with LoopbackServer(app) as url:

            async def ask():
                async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                    return await asyncio.gather(*[client.post("/v1/completions", json={
                        "prompt": p, "max_tokens": m, "temperature": 0, "stop": []}) for p, m in asks])  # fmt: skip

            answers = asyncio.run(ask())
            assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
            assert [a.json()["choices"][0]["token_ids"] for a in answers] == want
            text = httpx.post(f"{url}/v1/completions", json={"prompt": "w5 w9 w17", "max_tokens": 6,
                                                             "temperature": 0}, timeout=120).json()  # fmt: skip
            tokens = whole.generate(whole.encode(["w5 w9 w17"]), max_new_tokens=6).tokens[0]
            assert text["choices"][0]["token_ids"] == tokens and text["choices"][0]["text"] == whole.decode(tokens)
            health = httpx.get(f"{url}/health").json()
            assert "sharded (tp 2 x pp 1)" in health["backend"]
            metrics = httpx.get(f"{url}/metrics").text
            total = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("adapter_batch_size_")]
            assert total[-1] / total[-2] > 1.3  # steps ran several rows (sum / count of rows per step)
    finally:
        outcome = engine.close()
    assert outcome["result"]["calls"] > len(asks) and all(r["ok"] for r in outcome["ranks"]), outcome
    assert outcome["leftover"] == 0


@pytest.mark.parametrize(("tp", "pp", "chunk"), [(1, 2, 4), (2, 1, 0)])
def test_the_batcher_over_ranks_equals_the_unsharded_engine(source, tp, pp, chunk):
    whole = source[2]
    folder = _sharded(source, tp, pp)
    engine = ShardedEngine(folder, artifact.read_manifest(folder))
    asks = _asks(whole.layout.vocab_size, 8)
    want = [whole.generate([p], max_new_tokens=m).tokens[0] for p, m in asks]
    endings = Endings(len(asks))
    batcher = ContinuousBatcher(engine.session, engine.layout, rows=3, capacity=40, chunk=chunk)
    requests = [Completion(p, m, Sampling(), endings.emit(i)) for i, (p, m) in enumerate(asks)]
    try:
        run_batcher(batcher, requests, endings, 120)
    finally:
        outcome = engine.close()
    assert [r.tokens for r in requests] == want
    assert outcome["result"]["joins"] >= 2 and len(outcome["ranks"]) == tp * pp


def test_ranks_that_cannot_start_give_a_clear_error(source, tmp_path):
    folder = _sharded(source, 2, 1)
    manifest = {**artifact.read_manifest(folder), "world_size": 3}  # the launcher refuses: 3 != 2 x 1 processes
    engine = ShardedEngine(folder, manifest)
    with pytest.raises(Exception, match="did not start"):
        engine.slots(2, 16)
    engine.close()
