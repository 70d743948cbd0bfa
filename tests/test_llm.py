"""Causal LMs: KV-cache export, decoder engines on ONNX Runtime and OpenVINO, generate.

Every decoder family is exported once and built on both CPU backends; each engine's
prefill and decode logits are compared to eager PyTorch and its greedy tokens over 32
steps must equal the eager model's. Reduced weights are judged by next-token KL.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import subprocess
import sys
import weakref
from collections import Counter

import numpy as np
import onnx_ir as ir
import onnxruntime
import pytest
import torch

from adapter.backends import get_backend
from adapter.core.errors import AdapterError, InputMismatchError, SourceError, VerificationError
from adapter.core.mapped import mapped_resident_bytes
from adapter.llm import convert as convert_module
from adapter.llm.convert import LLMOptions, _widening, backend_graph, convert_causal_lm
from adapter.llm.engine import LLMEngine
from adapter.llm.export import eager_step, export_decoder
from adapter.llm.families import (
    FAMILIES,
    CausalLM,
    tiny_config,
    tiny_model,
    write_random_folder,
    write_word_tokenizer,
)
from adapter.llm.generate import Sampling, generate, left_pad
from adapter.llm.verify import EagerReference, eager_greedy, verify_decoder
from adapter.passes import build_pipeline, run_pipeline
from adapter.passes.weight_only import WeightOnlyQuantize

pytestmark = pytest.mark.slow

LLAMACPP_FAMILIES = {"llama", "mistral", "qwen2", "qwen3"}
"""The families the llama.cpp backend writes as GGUF."""


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_greedy_equals_eager_on_both_backends(family, tmp_path):
    # one block per family (the export's cost grows with the graph; several blocks and the
    # per-layer cache are covered by the two-block Llama below)
    layers = {"n_layer": 1} if family == "gpt2" else {"num_hidden_layers": 1}
    lm = CausalLM(tiny_model(family, **layers), family, f"tiny-{family}", "factory")
    result = convert_causal_lm(lm, tmp_path / family, LLMOptions(benchmark=False))
    candidates = {c["name"]: c for c in result.manifest["backend"]["candidates"]}
    llamacpp = candidates.pop("llamacpp", None)  # in the race where llama-cpp-python is installed
    assert set(candidates) == {"onnxruntime", "openvino"}, candidates
    if llamacpp is not None and family not in LLAMACPP_FAMILIES:
        assert f"not '{family}'" in llamacpp["error"], llamacpp
    elif llamacpp is not None:
        candidates["llamacpp"] = llamacpp  # its FP32 GGUF engine holds to the same numbers
    if family in LLAMACPP_FAMILIES and importlib.util.find_spec("llama_cpp") is not None:
        assert llamacpp is not None and "error" not in llamacpp, llamacpp
    # every family's attention fuses to GroupQueryAttention, so ONNX Runtime's engine writes
    # the cache in place (GPT-2's through MultiHeadAttention's own past, the others' through
    # the exporter's concatenation)
    assert candidates["onnxruntime"]["config"]["kv_cache"] == "shared", candidates["onnxruntime"]["config"]
    for name, cand in candidates.items():
        assert "error" not in cand, (name, cand.get("error"))
        report = cand["verification"]
        assert report["greedy"] == {"steps": 32, "equal": True, "first_difference": None}, name
        assert report["prefill"]["max_abs"] < 1e-4 and report["decode"]["max_abs"] < 1e-4, (name, report)
        assert report["prefill"]["cosine"] > 0.99999, (name, report)


def test_falcon_caches_its_kv_heads_not_the_broadcast():
    """Falcon-40B/180B-style attention (4 query heads over 2 KV heads here): transformers'
    eager cache holds 4 broadcast heads, the exported graph's cache only the 2 KV heads,
    and its logits and presents equal eager PyTorch's (on the KV heads)."""
    model = tiny_model("falcon", num_hidden_layers=1)
    graph, layout, _ = export_decoder(model, "falcon")
    assert layout.kv_heads == 2 and model.config.num_attention_heads == 4
    past = next(v for v in graph.graph.inputs if v.name == "past_key_values.0.key")
    present = next(v for v in graph.graph.outputs if v.name == "present.0.key")
    assert past.shape[1] == 2 and present.shape[1] == 2, (past.shape, present.shape)
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(3, layout.vocab_size, (2, 3)).astype(np.int64),
        "attention_mask": np.ones((2, 8), np.int64),
        "position_ids": np.tile(np.arange(5, 8), (2, 1)).astype(np.int64),
    }
    for name in layout.past_names():
        feeds[name] = rng.standard_normal(layout.cache_shape(2, 5)).astype(np.float32)
    session = onnxruntime.InferenceSession(ir.serde.serialize_model(graph).SerializeToString())
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    expected = eager_step(model, feeds, layout)
    for name in ("logits", *layout.present_names()):
        assert got[name].shape == expected[name].shape, name
        np.testing.assert_allclose(got[name], expected[name], atol=1e-4, rtol=1e-4, err_msg=name)


@pytest.fixture(scope="module")
def llama():
    """A tiny Llama (GQA 4:2) exported once, canonicalized, for the engine tests."""
    model = tiny_model("llama")
    graph, layout, _ = export_decoder(model, "llama")
    run_pipeline(graph, build_pipeline(["canonicalize"]))
    return model, graph, layout


def _session(backend, graph, layout, folder, passes=False, **settings):
    """A decoder session over ``graph`` as exported, or after the backend's own passes."""
    decoder = get_backend(backend).DECODER
    if passes:
        graph = graph.clone()
        run_pipeline(graph, build_pipeline(list(decoder.PASSES)))
    config = decoder.build(graph, layout, folder, {"weights": "fp32", "threads": 1, **settings})
    return decoder.load(folder, config, layout)


@pytest.mark.parametrize(
    ("backend", "passes"), [("onnxruntime", False), ("onnxruntime", True), ("openvino", False), ("openvino", True)]
)
def test_left_padded_batch_equals_each_prompt_alone(llama, backend, passes, tmp_path):
    model, graph, layout = llama
    session = _session(backend, graph, layout, tmp_path, passes=passes, kv_precision="f32")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33]]
    together = generate(session, layout, prompts, 12, stop_at_eos=False).tokens
    alone = [generate(session, layout, [p], 12, stop_at_eos=False).tokens[0] for p in prompts]
    assert together == alone


def test_openvino_keeps_the_cache_as_state_and_fuses_norm_and_rotary(llama, tmp_path):
    """OpenVINO's decoder: the past is no input (ReadValue/Assign per layer and part, the CPU
    plugin's MemoryInput/MemoryOutput), RMSNorm and rotary fused by the plugin (RMS, RoPE: its
    x86-64 kernels need AVX2, which every CI class has); its steps equal eager PyTorch's
    logits. Attention is not fused (no ScaledAttn): the exporter's shape arithmetic around
    it keeps OpenVINO's SDPA pattern from matching."""
    import openvino as ov

    model, graph, layout = llama
    session = _session("openvino", graph, layout, tmp_path, passes=True, kv_precision="f32")
    names = {p.get_any_name() for p in session.compiled.inputs}
    assert names == {"input_ids", "attention_mask", "position_ids", "beam_idx", "logits_from"}, names
    saved = ov.Core().read_model(str(tmp_path / "decoder.xml"))
    ops = Counter(op.get_type_name() for op in saved.get_ordered_ops())
    assert ops["ReadValue"] == ops["Assign"] == 2 * layout.num_layers, ops
    runtime = Counter(op.get_rt_info()["layerType"].astype(str) for op in session.compiled.get_runtime_model().get_ordered_ops())
    assert runtime["MemoryInput"] == runtime["MemoryOutput"] == 2 * layout.num_layers, runtime
    assert runtime["RMS"] == 2 * layout.num_layers + 1 and runtime["RoPE"] == 2 * layout.num_layers, runtime
    # fuse-ov-attention + the beam gathers: one attention node per layer over the cache it keeps
    assert runtime["ScaledDotProductAttention"] == layout.num_layers and not runtime["Softmax"], runtime
    ids, mask, positions = left_pad([[5, 6, 7, 8, 9], [20, 21]], 0)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    for name in layout.past_names():
        feeds[name] = np.zeros(layout.cache_shape(2, 0), np.float32)
    # last-only steps: the graph's LM head computes one position per row, the same numbers
    session.start(2, 16)
    full = session.step(ids, mask, positions)
    session.start(2, 16)
    last = session.step(ids, mask, positions, last_only=True)
    assert session.request.get_output_tensor(0).shape[1] == 1  # sliced in the graph
    np.testing.assert_allclose(last, full[:, -1:], rtol=1e-5, atol=1e-5)
    session.start(2, 16)
    for _ in range(3):
        got = session.step(feeds["input_ids"], feeds["attention_mask"], feeds["position_ids"])
        want = eager_step(model, feeds, layout)
        valid = feeds["attention_mask"][:, -got.shape[1] :].astype(bool)
        assert np.abs(got[valid] - want["logits"][valid]).max() < 1e-4
        nxt = want["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
        feeds = {
            "input_ids": nxt,
            "attention_mask": np.concatenate([feeds["attention_mask"], np.ones((2, 1), np.int64)], axis=1),
            "position_ids": feeds["position_ids"][:, -1:] + 1,
            **{p: want[q] for p, q in zip(layout.past_names(), layout.present_names())},
        }


def test_gqa_fusion_writes_the_cache_in_place_and_keeps_the_numbers(llama, tmp_path):
    """fusion-ort-decoder: per layer one GroupQueryAttention over the past buffer and packed
    projections; the engine
    allocates each layer's cache once and every step writes into it; logits equal the
    unfused graph's at every valid position of a left-padded batch, steps after steps."""
    model, graph, layout = llama
    fused = graph.clone()
    records = {r.name: r for r in run_pipeline(fused, build_pipeline(["fusion-ort-decoder"]))}
    assert records["fuse-ort-gqa"].counters == {"gqa": 2, "past_shape_reads": 2}
    # per block: Q/K/V and gate/up, each one MatMul + Split (the numbers below cover it too)
    assert records["pack-sibling-matmuls"].counters == {"packed": 4, "matmuls_merged": 10}
    ops = Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in fused.graph)
    assert ops["com.microsoft::GroupQueryAttention"] == 2 and ops["com.microsoft::RotaryEmbedding"] == 4
    assert ops["com.microsoft::SkipSimplifiedLayerNormalization"] == 4 and "com.microsoft::MultiHeadAttention" not in ops
    pasts = {v.name for v in fused.graph.inputs if v.name.startswith("past_key_values")}
    assert all(u.op_type == "GroupQueryAttention" for v in fused.graph.inputs if v.name in pasts for u, _ in v.uses())

    plain = _session("onnxruntime", graph, layout, tmp_path / "plain")
    shared = _session("onnxruntime", fused, layout, tmp_path / "fused")
    assert shared.shared and not plain.shared
    ids, mask, positions = left_pad([[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]], 0)
    plain.start(2, 16)
    shared.start(2, 16)
    buffers = [v.data_ptr() for v in shared.cache]
    assert len(set(buffers)) == 2 * layout.num_layers  # one buffer per layer and part
    for _ in range(5):
        want, got = plain.step(ids, mask, positions), shared.step(ids, mask, positions)
        valid = mask[:, -got.shape[1] :].astype(bool)
        assert np.abs(got[valid] - want[valid]).max() < 1e-5
        ids = want[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        assert [v.data_ptr() for v in shared.cache] == buffers  # written in place, never reallocated
    assert np.abs(shared.arrays[0][:, :, : mask.shape[1] - 1]).max() > 0  # the positions so far, in the buffer
    assert not shared.arrays[0][:, :, mask.shape[1] :].any()  # the rest still free
    with pytest.raises(AdapterError, match="cache positions"):
        shared.step(ids, np.ones((2, 17), np.int64), positions)


def test_verification_catches_a_wrong_decoder(llama, tmp_path):
    model, graph, layout = llama
    session = _session("onnxruntime", graph, layout, tmp_path)

    class Skewed:
        """The real session with one logit raised after the prompt: greedy tokens change."""

        def start(self, batch, capacity):
            session.start(batch, capacity)

        def step(self, ids, mask, positions, last_only=False):
            logits = session.step(ids, mask, positions, last_only=last_only)
            if ids.shape[1] == 1:
                logits[..., 7] += 5.0
            return logits

    with pytest.raises(VerificationError, match="greedy tokens differ|max-abs"):
        verify_decoder(Skewed(), model, layout, "fp32", LLMOptions())
    report = verify_decoder(session, model, layout, "fp32", LLMOptions())
    assert report["passed"] and report["greedy"]["equal"]


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_verification_from_the_eager_reference_needs_no_model(llama, weights, tmp_path):
    """The answers computed once give the report the model gives. Verifying from the
    reference needs no model at all; handed a model instead, the check runs it (a model
    that raises stops it), which is what the convert no longer does per rung."""
    model, graph, layout = llama
    decoder = get_backend("onnxruntime").DECODER
    built = graph
    if weights == "int8":
        built = graph.clone()
        WeightOnlyQuantize(bits=8, block_size=32)(built)
    session = decoder.load(tmp_path, decoder.build(built, layout, tmp_path, {"weights": weights, "threads": 1}), layout)
    direct = verify_decoder(session, model, layout, weights, LLMOptions())
    reference = EagerReference.of(model, layout, weights, LLMOptions().verify_steps)

    class Gone(torch.nn.Module):
        config = model.config

        def forward(self, *args, **kwargs):
            raise AssertionError("the eager model ran during verification")

    assert verify_decoder(session, reference, layout, weights, LLMOptions()) == direct
    with pytest.raises(AssertionError, match="eager model ran"):
        verify_decoder(session, Gone(), layout, weights, LLMOptions())
    if weights == "fp32":
        assert direct["greedy"]["equal"] and direct["prefill"]["max_abs"] < 1e-4, direct
    else:
        assert 0 < direct["kl_mean"] <= 0.05, direct


@pytest.mark.parametrize("backend", ["onnxruntime", "llamacpp"])
def test_convert_lets_go_of_the_eager_model_before_any_engine_builds(qwen_folder, backend, tmp_path, monkeypatch):
    """Engines from ONNX graphs build from the weights' file, llama.cpp from the FP32 GGUF
    its prepare step wrote: the eager model loaded from the folder is gone by then (only
    the eager reference remains), and the engine still verifies against it (FP32: greedy
    tokens equal). No scratch folder reaches the artifact."""
    if backend == "llamacpp" and importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (tools/install-test-deps.sh builds it)")
    loaded, seen = [], {}
    real_load, real_build = convert_module.load_causal_lm, convert_module._build_one

    def tracked(folder):
        lm = real_load(folder)
        loaded.extend(weakref.ref(t) for t in [lm.model, *lm.model.parameters()])
        return lm

    def build_one(name, graph, *args, **kwargs):
        # the graph the engines build from holds its weights in the file, not in memory
        seen["graph"] = None if graph is None else {
            type(v.const_value).__name__ for v in graph.graph.initializers.values()
            if v.const_value is not None and v.const_value.nbytes > 1024  # what save_model puts in the file
        }  # fmt: skip
        return real_build(name, graph, *args, **kwargs)

    def progress(stage):
        if stage.startswith(f"build {backend}"):
            gc.collect()
            seen["alive"] = sum(ref() is not None for ref in loaded)

    monkeypatch.setattr(convert_module, "load_causal_lm", tracked)
    monkeypatch.setattr(convert_module, "_build_one", build_one)
    result = convert_causal_lm(str(qwen_folder), tmp_path / "e", LLMOptions(backend=backend, benchmark=False),
                               progress=progress)  # fmt: skip
    assert len(loaded) > 1 and seen["alive"] == 0, seen  # the module and every parameter
    assert seen["graph"] == ({"ExternalTensor"} if backend == "onnxruntime" else None), seen
    assert result.manifest["verification"]["greedy"]["equal"], result.manifest["verification"]
    assert not any(p.name.startswith(".") for p in (tmp_path / "e").iterdir())


@pytest.mark.parametrize(
    ("backend", "weights", "settings"),
    [
        ("onnxruntime", "int4", {"block_size": 32, "symmetric": True}),
        ("onnxruntime", "int8", {"block_size": 32, "symmetric": True}),
        ("openvino", "int4", {"block_size": 32, "symmetric": False}),
    ],
)
def test_weight_only_engines_stay_within_the_kl_budget(llama, backend, weights, settings, tmp_path):
    model, graph, layout = llama
    decoder = get_backend(backend).DECODER
    built = graph
    if weights in decoder.QUANTIZE_IN_GRAPH:
        built = graph.clone()
        quantize = WeightOnlyQuantize(bits=4 if weights == "int4" else 8, block_size=32)
        quantize(built)
        counts = quantize.record.counters
        assert counts["quantized"] == 14 and counts["kept_fp32"] == 1, counts  # 7 per layer; LM head kept
        assert sum(n.op_type == "MatMulNBits" for n in built.graph) == 14
    config = decoder.build(built, layout, tmp_path, {"weights": weights, "threads": 1, **settings})
    session = decoder.load(tmp_path, config, layout)
    report = verify_decoder(session, model, layout, weights, LLMOptions())
    assert 0 < report["kl_mean"] <= 0.05, report  # quantized: not bit-exact, but close
    assert report["greedy_agreement"] >= 0.6, report
    with pytest.raises(VerificationError, match="KL divergence"):
        verify_decoder(session, model, layout, weights, LLMOptions(kl_budget=report["kl_mean"] / 10))


def _weight_types(path) -> dict[str, str]:
    """Each MatMul's weight element type in an OpenVINO IR (through its decompression ops)."""
    import openvino as ov

    types = {}
    for op in ov.Core().read_model(str(path)).get_ops():
        if op.get_type_name() != "MatMul":
            continue
        node = op.input_value(1).get_node()
        while node.get_type_name() != "Constant" and node.get_input_size():
            node = node.input_value(0).get_node()
        types[op.get_friendly_name()] = node.get_output_element_type(0).get_type_name()
    return types


def test_openvino_int4_keeps_the_widened_blocks_int8(llama, tmp_path):
    """The widening ladder's blocks reach OpenVINO: NNCF compresses block 0's MatMuls to
    INT8 and block 1's to INT4 (named through the ONNX node names OpenVINO keeps); the
    engine quantizes activations in the weights' group size."""
    model, graph, layout = llama
    decoder = get_backend("openvino").DECODER
    settings = {"weights": "int4", "threads": 1, "block_size": 64, "symmetric": False, "int8_blocks": [0]}
    config = decoder.build(graph, layout, tmp_path, settings)
    types = _weight_types(tmp_path / config["model_file"])
    modules = {
        n.name: n.metadata_props.get("adapter.module", "")
        for n in graph.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None
    }  # fmt: skip
    block0 = {types[n] for n, m in modules.items() if "layers.0." in m}
    block1 = {types[n] for n, m in modules.items() if "layers.1." in m and "down_proj" not in m}
    # (NNCF keeps the graph's last MatMul over a weight, here block 1's down_proj, at 8 bits itself)
    assert block0 == {"u8"} and block1 == {"u4"}, (block0, block1)
    session = decoder.load(tmp_path, config, layout)
    # activations are quantized on the fly in the weights' group size (the plugin's default is 32)
    assert session.compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == 64
    report = verify_decoder(session, model, layout, "int4", LLMOptions())
    assert 0 < report["kl_mean"] <= 0.05, report


def test_openvino_engine_hands_back_its_mapped_weights_after_the_first_steps(llama, tmp_path):
    """Once the CPU plugin has packed its own copy of the weights (first prefill and decode),
    the mapped IR's pages are released; generating goes on with the same tokens."""
    model, graph, layout = llama
    session = _session("openvino", graph, layout, tmp_path, passes=True)
    weights = tmp_path / "decoder.bin"
    first = generate(session, layout, [[5, 6, 7, 8]], 6, stop_at_eos=False).tokens
    assert mapped_resident_bytes(weights) <= weights.stat().st_size // 2, (mapped_resident_bytes(weights), weights)
    assert generate(session, layout, [[5, 6, 7, 8]], 6, stop_at_eos=False).tokens == first


def test_int4_recipe_on_the_fused_onnxruntime_graph(llama, tmp_path):
    """The driver's ONNX Runtime INT4 graph: fused (GroupQueryAttention, shared cache), every
    block INT4, the LM head INT8, the rotary frequencies untouched; within the KL budget."""
    model, graph, layout = llama
    decoder = get_backend("onnxruntime").DECODER
    settings = {"block_size": 32, "symmetric": True}
    built, records = backend_graph(graph, decoder, LLMOptions(weights="int4"), settings)
    assert built is not graph and sum(n.op_type == "MatMulNBits" for n in graph.graph) == 0  # a copy
    bits = Counter(n.attributes["bits"].value for n in built.graph if n.op_type == "MatMulNBits")
    assert bits == {4: 8, 8: 1}, bits  # per block: packed Q/K/V, output, packed gate/up, down
    head = [n for n in built.graph if n.op_type == "MatMulNBits" and n.attributes["bits"].value == 8]
    assert head[0].attributes["N"].value == layout.vocab_size  # the 8-bit one is the LM head
    rotary = [n for n in built.graph if n.op_type == "MatMul"]
    assert len(rotary) == 1 and rotary[0].inputs[1].const_value.shape[0] == 1  # positions x inverse frequencies
    assert [r["counters"]["quantized"] for r in records if r["name"] == "weight-only-quantize"] == [1, 8]
    config = decoder.build(built, layout, tmp_path, {"weights": "int4", "threads": 1, **settings})
    assert config["kv_cache"] == "shared"
    report = verify_decoder(decoder.load(tmp_path, config, layout), model, layout, "int4", LLMOptions())
    assert 0 < report["kl_mean"] <= 0.05 and report["greedy_agreement"] >= 0.6, report
    fp32_head, _ = backend_graph(graph, decoder, LLMOptions(weights="int4", head_int8=False), settings)
    assert Counter(n.op_type for n in fp32_head.graph)["MatMul"] == 2  # the head stays FP32 when asked


def test_int4_widening_tries_the_first_blocks_before_both_ends():
    assert _widening("int4", 22) == [(), (0, 1), (0, 1, 20, 21), (0, 1, 2, 3, 4, 17, 18, 19, 20, 21)]
    assert _widening("int4", 2) == [(), (0,), (0, 1)]
    assert _widening("int8", 22) == [()] and _widening("int4", 1) == [()]


def test_sampling_is_seeded_and_reduces_to_greedy():
    rng_logits = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    greedy = rng_logits.argmax(-1)
    from adapter.llm.generate import pick

    assert (pick(rng_logits, Sampling(temperature=0.7, top_k=1), np.random.default_rng(1)) == greedy).all()
    assert (pick(rng_logits, Sampling(temperature=0.7, top_p=1e-6), np.random.default_rng(1)) == greedy).all()
    a = pick(rng_logits, Sampling(temperature=1.0, seed=3), np.random.default_rng(3))
    b = pick(rng_logits, Sampling(temperature=1.0, seed=3), np.random.default_rng(3))
    assert (a == b).all()
    draws = np.stack([pick(rng_logits, Sampling(temperature=1.0), np.random.default_rng(s)) for s in range(40)])
    assert len({tuple(d) for d in draws}) > 1  # sampling really samples


def test_left_pad_masks_and_positions():
    ids, mask, positions = left_pad([[4, 5, 6], [7]], pad=0)
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    config = tiny_config("qwen2")
    folder = write_random_folder(config, tmp_path_factory.mktemp("hf") / "qwen2-tiny")
    write_word_tokenizer(folder, config.vocab_size)
    return folder


def test_cli_converts_a_folder_and_generates(qwen_folder, tmp_path, cli):
    out = tmp_path / "engine"
    code, stdout, stderr = cli("convert", qwen_folder, "-b", "onnxruntime", "-o", out, "--no-bench")
    assert code == 0, stderr
    assert "greedy tokens over 32 steps equal" in " ".join(stdout.split())
    code, stdout, stderr = cli("generate", out, "--prompt-ids", "5,6,7", "--prompt-ids", "9", "--max-new-tokens", "6", "--ignore-eos", "--json")  # fmt: skip
    assert code == 0, stderr
    data = json.loads(stdout)
    assert [len(t) for t in data["tokens"]] == [6, 6] and data["prompt_lengths"] == [3, 1]
    assert data["time_to_first_token_ms"] > 0 and data["decode_tokens_per_s"] > 0 and data["peak_rss_mb"] > 0
    engine = LLMEngine.load(out)
    model = tiny_model("qwen2")  # same seed and config: the folder's weights

    assert data["tokens"][0] == eager_greedy(model, [5, 6, 7], 6)
    assert engine.generate([[5, 6, 7]], max_new_tokens=6, stop_at_eos=False).tokens[0] == data["tokens"][0]
    # text through the bundled tokenizer, in processes that never import torch: the API's,
    # and the command line's (which loads only the command it runs)
    report = tmp_path / "light.json"
    script = (
        "import json, sys\n"
        "from adapter.llm.engine import LLMEngine\n"
        "from adapter.cli.main import main\n"
        f"engine = LLMEngine.load({str(out)!r})\n"
        "run = engine.generate(texts=['w5 w6 w7'], max_new_tokens=6, stop_at_eos=False)\n"
        f"code = main(['generate', {str(out)!r}, '--prompt', 'w5 w6 w7', '--max-new-tokens', '6', '--ignore-eos', '--json'])\n"
        f"open({str(report)!r}, 'w').write(json.dumps({{'ids': engine.encode(['w5 w6 w7']), 'tokens': run.tokens, "
        "'text': engine.decode(run.tokens[0]), 'code': code, 'torch': 'torch' in sys.modules}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    light = json.loads(report.read_text())
    assert light["code"] == 0 and json.loads(done.stdout)["tokens"] == light["tokens"], done.stdout
    assert not light["torch"], light
    # the Rust tokenizer alone gives what transformers' tokenizer of the engine's folder gives
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(out / "tokenizer"), local_files_only=True)
    ids = reference("w5 w6 w7")["input_ids"]
    assert light["ids"] == [ids] and len(ids) > 0, (light, ids)
    assert light["tokens"][0] == engine.generate([ids], max_new_tokens=6, stop_at_eos=False).tokens[0]
    assert light["text"] == reference.decode(light["tokens"][0], skip_special_tokens=True), light
    engine.manifest["tokenizer"], engine._tokenizer = None, None
    with pytest.raises(InputMismatchError, match="no tokenizer"):
        engine.encode(["w5"])
    # bad input: one paragraph, non-zero exit, no traceback
    for args, words in [
        (["--prompt-ids", "5,999"], "outside the model's vocabulary"),
        (["--prompt-ids", "5", "--max-new-tokens", "400"], "positions"),
        (["--prompt-ids", "5,x"], "not a list of integers"),
    ]:
        code, stdout, stderr = cli("generate", out, *args)
        text = " ".join(stderr.split())
        assert code != 0 and words in text and "Traceback" not in text, (args, stderr)


def test_unsupported_or_unsafe_folders_are_refused(qwen_folder, tmp_path, cli):
    import shutil

    from adapter.llm.families import load_causal_lm

    other = tmp_path / "bloom"
    shutil.copytree(qwen_folder, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(
        json.dumps({**config, "model_type": "bloom", "architectures": ["BloomForCausalLM"]})
    )
    with pytest.raises(SourceError, match="cannot export with a KV cache"):
        load_causal_lm(other)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(qwen_folder / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(SourceError, match="no safetensors"):
        load_causal_lm(pickled)
    code, _, stderr = cli("convert", other, "-o", tmp_path / "x")
    assert code != 0 and "Supported families" in " ".join(stderr.split()) and "Traceback" not in stderr
    with pytest.raises(InputMismatchError, match="at least one token"):
        generate(None, None, [[]], 4)
