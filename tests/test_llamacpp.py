"""The llama.cpp backend: GGUF engines from the eager weights, run by llama.cpp, checked against eager.

FP32 engines must give eager PyTorch's logits and greedy tokens (the family test in
``test_llm.py`` builds one for every family the backend maps, inside the race); here the
INT4 recipe (Q4_0, the LM head and widened end blocks Q8_0, read back from the file),
left-padded batches, the ``last_only`` logits every session offers, and the refusals.
"""

from __future__ import annotations

import numpy as np
import pytest

from adapter.backends import get_backend, llamacpp
from adapter.core.errors import AdapterError
from adapter.llm.convert import LLMOptions, convert_causal_lm
from adapter.llm.export import layout_of
from adapter.llm.families import CausalLM, tiny_model
from adapter.llm.generate import generate
from adapter.llm.verify import verify_decoder

pytestmark = pytest.mark.slow
gguf = pytest.importorskip("gguf", reason="the llama.cpp backend's extra: pip install -e '.[llamacpp]'")
pytest.importorskip("llama_cpp", reason="the llama.cpp backend's extra: pip install -e '.[llamacpp]'")

DECODER = llamacpp.DECODER


@pytest.fixture(scope="module")
def llama4():
    """A tiny Llama with 4 blocks (two inner ones stay INT4 when the ends are widened)."""
    model = tiny_model("llama", num_hidden_layers=4)
    return CausalLM(model, "llama", "tiny-llama", "factory"), layout_of(model, "llama")


def _types(path) -> dict[str, str]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: t.tensor_type.name for t in reader.tensors}


def test_int4_is_q4_0_with_q8_0_head_and_widened_ends_within_the_kl_budget(llama4, tmp_path):
    lm, layout = llama4
    settings = {"weights": "int4", "threads": 1, "block_size": 32, "symmetric": True, "head_int8": True}
    config = DECODER.build(lm, layout, tmp_path, {**settings, "int8_blocks": [0, 3]})
    types = _types(tmp_path / config["model_file"])
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0", types
    for block, kind in ((0, "Q8_0"), (1, "Q4_0"), (2, "Q4_0"), (3, "Q8_0")):
        for part in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            assert types[f"blk.{block}.{part}.weight"] == kind, (block, part, types)
    assert types["blk.0.attn_norm.weight"] == "F32"  # norms stay FP32
    session = DECODER.load(tmp_path, config, layout)
    report = verify_decoder(session, lm.model, layout, "int4", LLMOptions())
    assert 0 < report["kl_mean"] <= 0.05, report
    assert not (tmp_path / ".f32").exists(), "the FP32 intermediate GGUF is removed"


def test_one_prepared_gguf_serves_every_rung_and_fp32(llama4, tmp_path):
    """prepare writes the FP32 GGUF once; builds quantize it (left as it was) or take it as
    the FP32 engine, whose logits equal the engine built straight from the eager model."""
    lm, layout = llama4
    source = DECODER.prepare(lm, layout, tmp_path / "prepared")
    before = source.read_bytes()
    settings = {"weights": "int4", "threads": 1, "block_size": 32, "symmetric": True, "head_int8": True}
    for blocks in ([], [0, 3]):
        config = DECODER.build(source, layout, tmp_path / f"int4-{len(blocks)}", {**settings, "int8_blocks": blocks})
        kinds = _types(tmp_path / f"int4-{len(blocks)}" / config["model_file"])
        assert kinds["blk.0.ffn_up.weight"] == ("Q8_0" if blocks else "Q4_0"), kinds
    assert source.read_bytes() == before
    ids = np.array([[5, 6, 7, 8]], np.int64)
    logits = []
    for name, model in (("from-prepared", source), ("from-eager", lm)):
        config = DECODER.build(model, layout, tmp_path / name, {"weights": "fp32", "threads": 1})
        session = DECODER.load(tmp_path / name, config, layout)
        session.start(1, 8)
        logits.append(session.step(ids, np.ones_like(ids), np.arange(4)[None]))
    np.testing.assert_array_equal(logits[0], logits[1])
    assert source.is_file()  # the FP32 engine is a second name for the prepared file, not a move


def test_asymmetric_int4_is_q4_1_and_other_group_sizes_are_refused(llama4, tmp_path):
    lm, layout = llama4
    settings = {"weights": "int4", "threads": 1, "block_size": 32, "symmetric": False, "head_int8": False}
    config = DECODER.build(lm, layout, tmp_path / "asym", settings)
    types = _types(tmp_path / "asym" / config["model_file"])
    assert types["blk.1.ffn_up.weight"] == "Q4_1", types
    with pytest.raises(AdapterError, match="32 weights, not 128"):
        DECODER.build(lm, layout, tmp_path / "g128", {**settings, "block_size": 128})


def test_left_padded_batch_equals_each_prompt_alone_and_last_only_logits(llama4, tmp_path):
    lm, layout = llama4
    config = DECODER.build(lm, layout, tmp_path, {"weights": "fp32", "threads": 1})
    session = DECODER.load(tmp_path, config, layout)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33]]
    together = generate(session, layout, prompts, 12, stop_at_eos=False).tokens
    alone = [generate(session, layout, [p], 12, stop_at_eos=False).tokens[0] for p in prompts]
    assert together == alone
    # a larger batch than the context was sized for makes a new context; the logits agree
    ids = np.array([[0, 0, 5, 6], [7, 8, 9, 10]], np.int64)
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]], np.int64)
    positions = np.array([[0, 0, 0, 1], [0, 1, 2, 3]], np.int64)
    session.start(2, 8)
    full = session.step(ids, mask, positions)
    session.start(2, 8)
    last = session.step(ids, mask, positions, last_only=True)
    assert last.shape == (2, 1, layout.vocab_size)
    np.testing.assert_allclose(last, full[:, -1:], atol=1e-5)
    assert not full[0, :2].any(), "padded positions give no logits"


def test_refusals_are_clear(tmp_path):
    gpt2 = tiny_model("gpt2", n_layer=1)
    with pytest.raises(AdapterError, match="maps llama, mistral, qwen2, qwen3 models, not 'gpt2'"):
        convert_causal_lm(CausalLM(gpt2, "gpt2", "tiny-gpt2", "factory"), tmp_path / "g", LLMOptions(backend="llamacpp"))
    backend = get_backend("llamacpp")
    assert not backend.PRECISIONS and not backend.AUTO_KINDS  # never in an ONNX graph's race
    with pytest.raises(AdapterError, match="generation engines only"):
        backend.compile(None, None, None, None, tmp_path)
