"""Causal LMs for other machines: the ARM edge decoder under qemu, TensorRT's recipe, TVM's
decoders for AMD and NVIDIA targets (verified through CPU stand-ins), and which backend a
GPU target's ``--backend auto`` takes."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from adapter.backends import _arm64, edge, get_backend
from adapter.core.errors import AdapterError
from adapter.llm.convert import LLMOptions, convert_causal_lm
from adapter.llm.engine import LLMEngine
from adapter.llm.export import export_decoder
from adapter.llm.families import CausalLM, tiny_model
from adapter.llm.generate import generate, left_pad
from adapter.llm.verify import eager_greedy
from adapter.passes import build_pipeline, run_pipeline

pytestmark = pytest.mark.slow

ARM64_ROOTFS = _arm64.default_rootfs()  # the user's cache, resolved before conftest's per-session one


@pytest.mark.arm64
@pytest.mark.skipif(_arm64.available() is not None, reason=str(_arm64.available()))
def test_edge_decoder_generates_on_emulated_arm64_as_eager(tmp_path):
    """The Raspberry Pi 5 profile's edge backend: its ORT-format decoder is verified through
    its x86 stand-in, then decodes 32 greedy tokens on the emulated ARM64 machine equal to
    eager PyTorch's."""
    model = tiny_model("llama", num_hidden_layers=1)
    lm = CausalLM(model, "llama", "tiny-llama", "factory")
    result = convert_causal_lm(lm, tmp_path / "e", LLMOptions(target="arm-cortex-a76", backend="edge", benchmark=False))
    backend = result.manifest["backend"]
    assert backend["name"] == "edge" and backend["config"]["kv_cache"] == "concat", backend
    assert backend["config"]["model_file"] == "decoder.ort" and backend["config"]["arch"] == "aarch64"
    assert result.manifest["verification"]["greedy"]["equal"], result.manifest["verification"]
    engine = LLMEngine.load(tmp_path / "e")
    prompt = [5, 6, 7, 8, 9]
    info: dict = {}
    on_arm = edge.generate_arm64(tmp_path / "e", backend["config"], engine.layout, prompt, 32,
                                 rootfs=ARM64_ROOTFS, info=info)  # fmt: skip
    assert info["machine"] == "aarch64" and info["onnxruntime"] == edge.version(), info
    assert on_arm == eager_greedy(model, prompt, 32)
    assert on_arm == engine.generate([prompt], max_new_tokens=32, stop_at_eos=False).tokens[0]


def test_tensorrt_decoder_recipe_has_kv_profiles_and_matches_eager(tmp_path):
    """The H100 profile's TensorRT decoder: a standard-domain decoder.onnx (GQA kept: 2 KV
    heads in the profiles), two optimization profiles over the context (any step, prefill),
    build.py/build.sh, and its stand-in (ONNX Runtime CPU over the same file) equal to eager."""
    import onnx

    model = tiny_model("llama", num_hidden_layers=1)
    lm = CausalLM(model, "llama", "tiny-llama", "factory")
    options = LLMOptions(target="nvidia-h100", backend="tensorrt", benchmark=False)
    result = convert_causal_lm(lm, tmp_path / "e", options)
    config = result.manifest["backend"]["config"]
    assert result.manifest["backend"]["name"] == "tensorrt" and not config["engine_built"], config
    assert result.manifest["verification"]["greedy"]["equal"], result.manifest["verification"]
    proto = onnx.load(str(tmp_path / "e" / "decoder.onnx"))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    layout = LLMEngine.load(tmp_path / "e").layout
    profiles = json.loads((tmp_path / "e" / "profiles.json").read_text())["profiles"]
    assert len(profiles) == 2
    context = layout.max_positions
    step, prefill = (p["inputs"] for p in profiles)
    for name in layout.past_names():
        assert step[name]["min"] == [1, 2, 0, layout.head_dim] and step[name]["max"] == [8, 2, context - 1, layout.head_dim]
        assert prefill[name]["max"][2] == 0
    assert step["input_ids"]["opt"] == [1, 1] and prefill["input_ids"]["max"] == [8, context]
    for phase in (step, prefill):  # the mask spans past + new at the opt shapes
        assert phase["attention_mask"]["opt"][1] == phase["input_ids"]["opt"][1] + phase["past_key_values.0.key"]["opt"][2]
    assert all(f"{name}:" in " ".join(config["trtexec"]) for name in layout.past_names())
    assert "--minShapes=" in " ".join(config["trtexec"])
    # the Triton kernels of its prefill and decode steps, compiled for sm_90 (4 query heads on 2 KV heads)
    kernels = {k["name"]: k for k in config["triton_kernels"]}
    assert {"attention_prefill", "attention_decode", "add_rmsnorm_prefill", "add_rmsnorm_decode",
            "rotary_prefill"} <= set(kernels), sorted(kernels)  # fmt: skip
    decode = kernels["attention_decode"]
    assert decode["problem"]["q_heads"] == 4 and decode["problem"]["kv_heads"] == 2 and decode["problem"]["m"] == 1
    assert len(kernels["add_rmsnorm_decode"]["nodes"]) == 2  # the norms after the two residual adds of the layer
    for kernel in kernels.values():
        binary = tmp_path / "e" / kernel["files"][0]
        assert binary.is_file() and binary.suffix == ".cubin" and kernel["arch"] == "sm_90"


def test_tvm_decoder_for_amd_carries_gfx942_code_and_its_stand_in_equals_eager(tmp_path):
    """The MI300X profile's generation engine (``--backend auto``: its default backend, TVM,
    alone): decode and prefill programs of fixed shapes in one library with hsaco for
    gfx942, the weights once (decoder.onnx) as the programs' parameters, and the stand-in
    (the same programs built for this CPU) equal to eager: greedy over 32 steps, and a
    left-padded batch equal to each prompt alone."""
    from adapter.backends import _tvm_rocm

    try:
        _tvm_rocm.rocm_path()
        _tvm_rocm.find_lld()
    except AdapterError as exc:
        pytest.skip(str(exc))
    model = tiny_model("llama", num_hidden_layers=1)
    lm = CausalLM(model, "llama", "tiny-llama", "factory")
    result = convert_causal_lm(lm, tmp_path / "e", LLMOptions(target="amd-mi300x", benchmark=False))
    backend = result.manifest["backend"]
    assert backend["name"] == "tvm" and [c["name"] for c in backend["candidates"]] == ["tvm"], backend
    config = backend["config"]
    assert config["kv_cache"] == "window" and config["window"] == model.config.max_position_embeddings
    triton = {k["name"]: k for k in config["triton_kernels"]}
    theirs = {f for k in triton.values() for f in k["files"]}
    objects = [f for f in config["files"] if f.endswith(".hsaco") and f not in theirs]  # TVM's own code objects
    assert objects and all(_tvm_rocm.code_object_arch(tmp_path / "e" / f) == "gfx942" for f in objects)
    # the Triton kernels beside TVM's code, at the programs' shapes (decode over the window)
    assert {"attention_decode", "attention_prefill", "add_rmsnorm_decode"} <= set(triton), sorted(triton)
    assert triton["attention_decode"]["problem"]["n"] == config["window"] and triton["attention_decode"]["arch"] == "gfx942"
    weights = ir.load(tmp_path / "e" / "decoder.onnx").graph.initializers
    assert config["params"] and all(weights[n].dtype.is_floating_point() for n in config["params"])
    assert result.manifest["verification"]["greedy"]["equal"], result.manifest["verification"]
    engine = LLMEngine.load(tmp_path / "e")
    assert engine.session.stand_in, "an MI300X library cannot run here: the session is the stand-in"
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33]]
    together = engine.generate(prompts, max_new_tokens=12, stop_at_eos=False).tokens
    assert together == [eager_greedy(model, p, 12) for p in prompts]


def test_tvm_decoder_refuses_a_context_beyond_its_window(tmp_path):
    """A TVM decoder built with a 16-position window on this CPU (its library runs here):
    start() refuses a longer context, and a step that would push a token out of the window
    is refused instead of dropping it; the steps before it equal eager's greedy tokens."""
    model = tiny_model("llama", num_hidden_layers=1)
    graph, layout, _ = export_decoder(model, "llama")
    run_pipeline(graph, build_pipeline(["canonicalize"]))
    decoder = get_backend("tvm").DECODER
    config = decoder.build(graph, layout, tmp_path, {"weights": "fp32", "threads": 1, "profile": "host", "window": 16})
    session = decoder.load(tmp_path, config, layout)
    assert session.stand_in is None and config["chunk"] == 16
    prompt = list(range(5, 15))
    with pytest.raises(AdapterError, match="holds 16 cache positions"):
        generate(session, layout, [prompt], 7, stop_at_eos=False)
    assert generate(session, layout, [prompt], 6, stop_at_eos=False).tokens[0] == eager_greedy(model, prompt, 6)
    session.start(1, 16)
    ids, mask, positions = left_pad([prompt], 0)
    session.step(ids, mask, positions)
    for step in range(7):
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        call = lambda m=mask, p=positions[:, -1:] + step + 1: session.step(np.array([[7]]), m, p)  # noqa: E731
        if step < 6:
            call()
        else:
            with pytest.raises(AdapterError, match="out of the TVM decoder's 16-position window"):
                call()


def test_gpu_targets_take_their_default_backend_where_it_builds_the_weights():
    """On a GPU target --backend auto is the profile's default backend alone (its engine is
    only a CPU stand-in here, so a race would time the wrong machine), unless that backend
    does not build the weights asked for: then the others that do."""
    from adapter.llm.convert import _candidates
    from adapter.profiles import load_profile

    amd, nvidia = load_profile("amd-mi300x"), load_profile("nvidia-h100")
    assert _candidates(LLMOptions(target="amd-mi300x"), amd) == ["tvm"]
    assert _candidates(LLMOptions(target="amd-mi300x", weights="int4"), amd) == ["onnxruntime"]
    assert _candidates(LLMOptions(target="nvidia-h100"), nvidia) == ["tensorrt"]
    assert "tensorrt" not in _candidates(LLMOptions(target="nvidia-h100", weights="int8"), nvidia)


def test_tensorrt_int4_decoder_dequantizes_blocked_int4_weights(tmp_path):
    """--weights int4 for the H100's TensorRT decoder: each projection's weights are INT4 in
    blocks along K behind a standard DequantizeLinear (opset 21, FP32 scales, no zero points:
    TensorRT's weight-only INT4), the LM head stays FP32, the recipe builds a strongly typed
    network, and the stand-in (ONNX Runtime over the same graph) is within the KL budget of
    eager FP32. Asymmetric INT4 is refused with a clear error."""
    import onnx

    model = tiny_model("llama", num_hidden_layers=1)
    lm = CausalLM(model, "llama", "tiny-llama", "factory")
    options = LLMOptions(target="nvidia-h100", backend="tensorrt", weights="int4", group_size=32, benchmark=False)
    result = convert_causal_lm(lm, tmp_path / "e", options)
    config = result.manifest["backend"]["config"]
    report = result.manifest["verification"]
    assert 0 < report["kl_mean"] <= 0.05, report
    proto = onnx.load(str(tmp_path / "e" / "decoder.onnx"))
    assert {o.domain: o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {"": 21}
    weights = {t.name: t for t in proto.graph.initializer}
    dequantize = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dequantize) == 7, [n.name for n in dequantize]  # q, k, v, o, gate, up, down
    for node in dequantize:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes == {"axis": 0, "block_size": 32} and len(node.input) == 2, (node.name, attributes)
        q, scale = (weights[i] for i in node.input)
        assert q.data_type == onnx.TensorProto.INT4 and scale.data_type == onnx.TensorProto.FLOAT
        assert list(scale.dims) == [q.dims[0] // 32, q.dims[1]]
    users = {i for n in proto.graph.node if n.op_type == "MatMul" for i in n.input}
    assert all(n.output[0] in users for n in dequantize)
    head = [n for n in proto.graph.node if n.op_type == "MatMul" and any(
        weights.get(i) is not None and weights[i].data_type == onnx.TensorProto.FLOAT and list(weights[i].dims)[-1] == 128
        for i in n.input)]  # fmt: skip
    assert len(head) == 1  # the LM head's FP32 weight (vocabulary 128)
    assert "--stronglyTyped" in config["trtexec"]
    assert "STRONGLY_TYPED = True" in (tmp_path / "e" / "build.py").read_text()
    with pytest.raises(AdapterError, match="symmetric"):
        convert_causal_lm(lm, tmp_path / "asym", LLMOptions(target="nvidia-h100", backend="tensorrt", weights="int4",
                                                            group_size=32, symmetric=False, benchmark=False))  # fmt: skip
