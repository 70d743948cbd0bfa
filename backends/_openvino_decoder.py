"""OpenVINO generation engines: a stateful model, the KV cache held inside OpenVINO.

``build`` converts the exported decoder, turns each ``past``/``present`` pair into an
internal state (``apply_make_stateful_transformation``, what OpenVINO GenAI runs), so a
step takes only the new tokens, mask and positions, and OpenVINO keeps and grows the
cache in its own buffers (its CPU plugin fuses the attention with the state as
``ScaledDotProductAttentionWithKVCache``). Weight-only INT8/INT4 come from NNCF's
``compress_weights`` on the OpenVINO model (group-wise, symmetric or not).
"""

from __future__ import annotations

__all__ = ["PASSES", "SOURCE", "AUTO_KINDS", "WEIGHTS", "QUANTIZE_IN_GRAPH", "WEIGHT_DEFAULTS", "OpenVINODecoder", "OpenVINOSlots", "prepare", "build", "load"]

import logging
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from adapter.backends._openvino_paged import PagedSlots, to_paged
from adapter.backends._state_slots import StateSlots
from adapter.backends.base import graph_as_is
from adapter.core.errors import AdapterError, BackendUnavailableError
from adapter.core.mapped import Releaser
from adapter.core.onnx_io import release_weights, save_model

MODEL_FILE = "decoder.xml"
SOURCE = "graph"
AUTO_KINDS = frozenset({"cpu", "gpu"})
"""Joins the generation race wherever the target lists the backend."""
WEIGHTS = frozenset({"fp32", "bf16", "int8", "int4"})
QUANTIZE_IN_GRAPH = frozenset()
PASSES = ("fusion-ov-decoder",)
"""Attention as ONNX ``Attention`` (OpenVINO's ScaledDotProductAttention): with the
``beam_idx`` gather on each state (:func:`_beam_gathers`), the CPU plugin then fuses the
state, its concatenation and the attention into one node that keeps the cache itself."""
BEAM_INPUT = "beam_idx"
LOGITS_FROM = "logits_from"
"""Where the logits start along the sequence: 0 (every position) or -1 (the last)."""
WEIGHT_DEFAULTS = {"block_size": 128, "symmetric": False}
"""Usual INT4/INT8 settings (optimum-intel's INT4 default: group 128, asymmetric)."""
_MODES = {
    ("int4", True): "INT4_SYM",
    ("int4", False): "INT4_ASYM",
    ("int8", True): "INT8_SYM",
    ("int8", False): "INT8_ASYM",
}


def _reason(exc: Exception) -> str:
    """OpenVINO's message without its source-location lines."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and "src/" not in line]
    return " ".join(lines)[:400] or type(exc).__name__


def _compress(model, settings: dict[str, Any], wider: list[str], rest: list[str]):
    """NNCF's weight compression; an INT4 engine's ``wider`` MatMuls (by name) go INT8 first,
    then the ``rest`` INT4 (NNCF keeps the LM head and the embedding INT8 itself)."""
    try:
        import nncf
    except ImportError as exc:
        raise BackendUnavailableError(
            "OpenVINO's weight compression needs NNCF.", "Install it: pip install nncf==3.4.0."
        ) from exc
    symmetric = bool(settings.get("symmetric", False))
    mode = getattr(nncf.CompressWeightsMode, _MODES[(settings["weights"], symmetric)])
    steps: list[dict[str, Any]] = []
    if settings["weights"] == "int4" and wider:
        steps.append({"mode": getattr(nncf.CompressWeightsMode, _MODES[("int8", symmetric)]),
                      "ignored_scope": nncf.IgnoredScope(names=rest, validate=False)})  # fmt: skip
    step: dict[str, Any] = {"mode": mode}
    if settings["weights"] == "int4":
        step.update(group_size=int(settings.get("block_size", 128)), ratio=1.0)
        if wider:
            step["ignored_scope"] = nncf.IgnoredScope(names=wider, validate=False)
    steps.append(step)
    nncf.set_log_level(logging.ERROR)  # its per-build statistics table is not the user's concern
    try:
        for kwargs in steps:
            model = nncf.compress_weights(model, **kwargs)
        return model
    except Exception as exc:  # NNCF raises its own error types for bad group sizes and the like
        raise AdapterError(
            f"NNCF could not compress the decoder's weights to {settings['weights']}: {_reason(exc)}",
            "Choose a group size that divides the hidden size (--group-size 32/64/128).",
        ) from exc


def _weight_matmuls(model: ir.Model, blocks: list[int]) -> tuple[list[str], list[str]]:
    """Names of the MatMuls over constant weights in decoder ``blocks`` (their module path,
    HF's ``layers.i`` / ``h.i``), and of the others; OpenVINO keeps ONNX node names."""
    pieces = tuple(p for i in blocks for p in (f"layers.{i}.", f".h.{i}."))
    wider, rest = [], []
    for node in model.graph:  # (adapter.passes' matmul_weights is a sibling layer's, not importable here)
        weight = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) > 1 else None
        if weight is not None and weight.const_value is not None and node.name:
            module = node.metadata_props.get("adapter.module", "")
            (wider if any(p in module for p in pieces) else rest).append(node.name)
    return wider, rest


def _batch_sized_states(model, layout: Any) -> None:
    """Start each cache state as zeros of (batch of ``input_ids``, kv_heads, 0, head_dim).

    Without an initializer a state starts with batch 0, and the graph, which reads the
    batch from the past cache's shape, would reshape the first step's tensors to batch 0.
    """
    import openvino.opset13 as ops

    batch = ops.gather(ops.shape_of(model.input("input_ids"), "i64"), ops.constant(np.array([0], np.int64)), 0)
    rest = ops.constant(np.array([layout.kv_heads, 0, layout.head_dim], np.int64))
    shape = ops.concat([batch, rest], 0)
    for op in model.get_ops():
        if op.get_type_name() == "ReadValue":
            zero = ops.constant(np.array(0, dtype=np.float32)).output(0)
            if op.get_output_element_type(0) != zero.get_element_type():
                zero = ops.convert(zero, op.get_output_element_type(0)).output(0)
            op.set_arguments([ops.broadcast(zero, shape)])
    model.validate_nodes_and_infer_types()


def _beam_gathers(model) -> int:
    """Read each cache state through ``Gather(state, beam_idx, axis 0)`` (a new int32 input).

    OpenVINO's CPU plugin fuses ``ReadValue -> Gather(beam_idx) -> Concat -> SDPA`` (the
    stateful models optimum-intel exports) into attention over a cache it holds and grows
    in place; without the gather it decomposes the SDPA into MatMul/Softmax (measured,
    OpenVINO 2026.4). The engine feeds ``beam_idx = 0..batch-1`` (rows keep their cache).
    Returns how many states got one.
    """
    import openvino as ov
    import openvino.opset13 as ops

    beam = ops.parameter([-1], ov.Type.i32, name=BEAM_INPUT)
    beam.output(0).get_tensor().set_names({BEAM_INPUT})
    count = 0
    for op in model.get_ops():
        if op.get_type_name() != "ReadValue":
            continue
        users = list(op.output(0).get_target_inputs())
        gathered = ops.gather(op.output(0), beam, ops.constant(np.array(0, np.int64)))
        for user in users:
            if user.get_node().get_type_name() != "ShapeOf":  # shapes read the state's own batch
                user.replace_source_output(gathered.output(0))
        count += 1
    if count:
        model.add_parameters([beam])
        model.validate_nodes_and_infer_types()
    return count


def _logits_from(model) -> bool:
    """Let a step keep only the last position's logits: a Slice on the LM head's input from
    a new int64 input ``logits_from`` (0: every position, -1: the last one).

    The LM head is the largest matrix: a 128-token prefill computed 128 rows of logits for
    the one row a generation reads (TinyLlama INT4: 16.6 ms of a 276 ms prefill, 2 cores).
    Returns False, leaving the model as it is, where ``logits`` does not come straight from
    a MatMul over (batch, sequence, hidden).
    """
    import openvino as ov
    import openvino.opset13 as ops

    head = model.output("logits").get_node().input_value(0).get_node()
    rank = head.input_value(0).get_partial_shape().rank
    if head.get_type_name() != "MatMul" or rank.is_dynamic or rank.get_length() != 3:
        return False  # the slice runs along (batch, sequence, hidden)
    start = ops.parameter([1], ov.Type.i64, name=LOGITS_FROM)
    start.output(0).get_tensor().set_names({LOGITS_FROM})
    sliced = ops.slice(
        head.input_value(0), start, ops.constant(np.array([np.iinfo(np.int64).max])),
        ops.constant(np.array([1])), ops.constant(np.array([1])),
    )  # fmt: skip
    head.input(0).replace_source_output(sliced.output(0))
    model.add_parameters([start])
    model.validate_nodes_and_infer_types()
    return True


prepare = graph_as_is


def build(model: ir.Model, layout: Any, workdir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Convert to OpenVINO, make the cache a state, compress weights, save IR (xml + bin)."""
    import openvino as ov
    from openvino._offline_transformations import apply_make_stateful_transformation

    workdir.mkdir(parents=True, exist_ok=True)
    wider, rest = _weight_matmuls(model, list(settings.get("int8_blocks", ())))
    with tempfile.TemporaryDirectory(prefix="adapter-ov-llm-") as tmp:
        onnx_path = Path(tmp) / "decoder.onnx"
        save_model(model, onnx_path, external=True)
        release_weights(model)  # OpenVINO maps the file just written; the source's pages can go
        try:
            # read_model maps the weights file (convert_model would hold two copies: 8.2 GB for
            # TinyLlama's 4.4 GB); the mapping outlives the temporary folder's removal
            ov_model = ov.Core().read_model(str(onnx_path))
        except Exception as exc:
            raise AdapterError(f"OpenVINO could not read the decoder: {_reason(exc)}") from exc
    pairs = dict(zip(layout.past_names(), layout.present_names()))
    apply_make_stateful_transformation(ov_model, pairs)
    _batch_sized_states(ov_model, layout)
    _beam_gathers(ov_model)
    _logits_from(ov_model)
    if settings.get("weights") in ("int8", "int4"):
        ov_model = _compress(ov_model, settings, wider, rest)
    ov.save_model(ov_model, str(workdir / MODEL_FILE), compress_to_fp16=False)
    config = {"model_file": MODEL_FILE, "files": [MODEL_FILE, "decoder.bin"], **settings}
    if settings.get("weights") in ("int8", "int4") and settings.get("block_size"):
        # verified with it, so loaded with it (engines written before it say nothing: see load)
        config["activation_group"] = int(settings["block_size"])
    return config


def _stop_all(releasers: list[Releaser]) -> None:
    for releaser in releasers:
        releaser.stop()


class OpenVINODecoder:
    """A compiled stateful decoder with one infer request (the running batch's cache)."""

    def __init__(self, folder: Path, config: dict[str, Any], layout: Any) -> None:
        import openvino as ov

        properties = {
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "INFERENCE_NUM_THREADS": max(1, int(config.get("threads", 1))),
            "INFERENCE_PRECISION_HINT": "bf16" if config.get("weights") == "bf16" else config.get("compute", "f32"),
        }
        # activations quantized on the fly in groups of the weights' own group size: the
        # plugin's default (32) under a group-128 INT4 engine ran TinyLlama's prefill in
        # 374 ms and decoded 29.6 tok/s; matched, 278 ms and 33.4 tok/s (f32 hint, 2 cores).
        # INT8 weights are per channel; groups of the usual 128 took its prefill from 383
        # to 273 ms and its decode from 19.3 to 21.2 tok/s (256: 278 ms, 21.5; 2048: 528, 19.9).
        # The group is the one the engine was verified with: INT4 engines written before the
        # config recorded it used their block size, INT8 ones the plugin's default.
        group = config.get("activation_group")
        if group is None and config.get("weights") == "int4":
            group = config.get("block_size")
        if group:
            properties["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = int(group)
        # exact FP32 engines keep an FP32 cache: OpenVINO would otherwise compress it
        kv_precision = config.get("kv_precision") or ("f32" if config.get("weights") == "fp32" else None)
        if kv_precision:
            properties["KV_CACHE_PRECISION"] = kv_precision
        self.path, self.properties = Path(folder) / config["model_file"], properties
        try:
            model = ov.Core().read_model(str(self.path))  # the weights stay mapped from the file
        except Exception as exc:
            raise AdapterError(f"OpenVINO could not read '{self.path}': {_reason(exc)}") from exc
        self.beam = any(BEAM_INPUT in p.get_names() for p in model.inputs)
        self.slices = any(LOGITS_FROM in p.get_names() for p in model.inputs)  # engines built before it lack it
        del model
        # the plugin copies the weights into its own layout while compiling and at its first
        # prefill and decode; the mapped IR's pages are handed back all along (not only after)
        self.releaser = Releaser(self.path.with_suffix(".bin"))
        self._releasers = [self.releaser]
        weakref.finalize(self, _stop_all, self._releasers)  # a session dropped before its second step
        self._compiled = self._request = None
        self.steps = 0
        self.layout = layout

    def _compile(self, model):
        """Compile ``model`` (a path or an ``ov.Model``) with this engine's properties: on first
        use, so that a served engine compiles only the model it serves (stateful or paged)."""
        import openvino as ov

        self.releaser.stop()
        self.releaser = Releaser(self.path.with_suffix(".bin")).start()
        self._releasers.append(self.releaser)
        try:
            return ov.Core().compile_model(model, "CPU", self.properties)
        except Exception as exc:
            self.releaser.stop()
            raise AdapterError(f"OpenVINO could not compile '{self.path}': {_reason(exc)}") from exc

    @property
    def compiled(self):
        if self._compiled is None:
            self._compiled = self._compile(str(self.path))
        return self._compiled

    @property
    def request(self):
        if self._request is None:
            self._request = self.compiled.create_infer_request()
        return self._request

    def start(self, batch: int, capacity: int) -> None:
        self.request.reset_state()

    def step(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, last_only: bool = False
    ) -> np.ndarray:
        feed = {
            "input_ids": np.ascontiguousarray(input_ids, np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask, np.int64),
            "position_ids": np.ascontiguousarray(position_ids, np.int64),
        }
        if self.beam:
            feed[BEAM_INPUT] = np.arange(input_ids.shape[0], dtype=np.int32)
        if self.slices:  # the LM head computes the last position only when that is all we read
            feed[LOGITS_FROM] = np.array([-1 if last_only else 0], np.int64)
        try:
            self.request.infer(feed)
        except Exception as exc:
            raise AdapterError(f"OpenVINO failed in a decoder step: {_reason(exc)}") from exc
        self.steps += 1
        if self.steps == 2:  # packed by its first two steps (a prefill and a decode, or two prefills)
            self.releaser.stop()
        logits = self.request.get_output_tensor(0).data
        return np.array(logits[:, -1:] if last_only else logits, dtype=np.float32, copy=True)


    def slots(self, count: int, capacity: int) -> OpenVINOSlots:
        """Rows that requests join and leave between steps (continuous batching)."""
        return OpenVINOSlots(self, count, capacity)

    def paged_slots(self, count: int, capacity: int) -> PagedSlots:
        """Rows over a paged KV cache (``_openvino_paged``): a step runs the running rows'
        tokens and joining prompts' chunks together. Compiles the paged model (the stateful one
        is not compiled unless ``step`` or ``slots`` is used too)."""
        import openvino as ov

        if not self.beam or not self.slices:
            raise AdapterError(
                "This OpenVINO decoder was built before the inputs paging needs (beam_idx, logits_from). "
                "Convert the model again."
            )
        window = getattr(self.layout, "sliding_window", None)
        if window and window < capacity:  # the paged attention here attends over the whole sequence
            raise AdapterError(
                f"The model attends over a sliding window of {window} positions, fewer than the {capacity} a request "
                "may use; its paged attention would attend over all of them.",
                f"Serve it with --capacity {window} or without paging (--no-paged).",
            )
        model = to_paged(ov.Core().read_model(str(self.path)), self.layout.kv_heads, self.layout.head_dim)

        def packed() -> None:  # the weights are in the plugin's layout after its first two steps
            if slots.steps == 2:
                self.releaser.stop()

        slots = PagedSlots(self._compile(model), count, capacity, packed)
        return slots


class OpenVINOSlots(StateSlots):
    """Continuous batching over the stateful decoder (``_state_slots.StateSlots``): the running
    rows are one infer request's state, prompts are prefilled in a second request of the same
    compiled model. Rows leave and change places through ``beam_idx`` (the fused attention
    gathers the state by it): no copy. A join reads both requests' states and writes the
    running one (8 rows of 200 positions, TinyLlama: 20 + 26 ms); one rebuild takes every
    prompt admitted since the last step."""

    fixed_batch = True

    def __init__(self, decoder: OpenVINODecoder, slots: int, capacity: int) -> None:
        if not decoder.beam:
            raise AdapterError(
                "This OpenVINO decoder was built without the beam_idx input (an engine from before it), so "
                "requests cannot join a running batch. Convert the model again."
            )
        super().__init__(slots, capacity)
        self.decoder = decoder
        self.main = decoder.compiled.create_infer_request()
        self.fill = decoder.compiled.create_infer_request()

    def _infer(self, request, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, beam) -> np.ndarray:
        feed = {
            "input_ids": np.ascontiguousarray(ids, np.int64),
            "attention_mask": np.ascontiguousarray(mask, np.int64),
            "position_ids": np.ascontiguousarray(positions, np.int64),
            BEAM_INPUT: np.asarray(beam, np.int32),
        }
        if self.decoder.slices:
            feed[LOGITS_FROM] = np.array([-1], np.int64)
        try:
            request.infer(feed)
        except Exception as exc:
            raise AdapterError(f"OpenVINO failed in a decoder step: {_reason(exc)}") from exc
        return np.array(request.get_output_tensor(0).data[:, -1], dtype=np.float32, copy=True)

    @staticmethod
    def _read(request) -> dict[str, np.ndarray]:
        return {state.name: np.array(state.state.data, copy=True) for state in request.query_state()}

    def _prefill(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, fresh: bool) -> np.ndarray:
        if fresh:
            self.fill.reset_state()
        return self._infer(self.fill, ids, mask, positions, [0])

    def _read_fill(self) -> dict[str, np.ndarray]:
        return self._read(self.fill)

    def _read_main(self) -> dict[str, np.ndarray]:
        return self._read(self.main)

    def _write_main(self, state: dict[str, np.ndarray]) -> None:
        import openvino as ov

        for variable in self.main.query_state():
            variable.state = ov.Tensor(np.ascontiguousarray(state[variable.name]))

    def _decode(self, tokens: np.ndarray, masks: np.ndarray, positions: np.ndarray, beam: list[int]) -> np.ndarray:
        return self._infer(self.main, tokens, masks, positions, beam)


def load(folder: Path, config: dict[str, Any], layout: Any) -> OpenVINODecoder:
    return OpenVINODecoder(folder, config, layout)
