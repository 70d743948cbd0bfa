"""ONNX Runtime generation engines: the exported decoder run step by step with I/O binding.

The graph arrives through the ``fusion-ort-decoder`` pipeline (``PASSES``): RMSNorm with
its residual add, rotary embedding and each layer's attention become ONNX Runtime's fused
ops, and where every layer's attention fits, ``GroupQueryAttention`` over a KV buffer
(``kv_cache: shared``). Then ``start`` allocates each layer's key and value buffer once,
for the whole batch and context, and every step binds the same buffer as the layer's
``past`` input and ``present`` output, so ONNX Runtime writes the new positions in place:
no cache tensor is allocated or copied per token, and only the logits come back to numpy.
A graph whose attention did not fuse (``kv_cache: concat``) runs as exported: each step
binds the previous step's ``present`` OrtValues as its ``past`` (never copied into numpy),
and ONNX Runtime allocates the longer ``present`` from its arena. Weight-only INT4/INT8
arrive already in the graph as ``MatMulNBits`` (the driver runs ONNX Runtime's quantizer
after the passes, before ``build``).
"""

from __future__ import annotations

__all__ = [
    "PASSES", "SOURCE", "AUTO_KINDS", "WEIGHTS", "QUANTIZE_IN_GRAPH", "WEIGHT_DEFAULTS", "OrtDecoder", "OrtSlots", "prepare",
    "build", "load",
]  # fmt: skip

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from adapter.backends.base import graph_as_is
from adapter.core import safety as _safety
from adapter.core.errors import AdapterError
from adapter.core.onnx_io import save_model

MODEL_FILE = "decoder.onnx"
PASSES = ("fusion-ort-decoder",)
"""Pipelines the driver runs on its copy of the canonical decoder graph before quantizing."""
SOURCE = "graph"
AUTO_KINDS = frozenset({"cpu", "gpu"})
"""Joins the generation race wherever the target lists the backend."""
WEIGHTS = frozenset({"fp32", "int8", "int4"})
QUANTIZE_IN_GRAPH = frozenset({"int8", "int4"})
"""Weight formats the driver realises in the ONNX graph (``MatMulNBits``) before ``build``."""
WEIGHT_DEFAULTS = {"block_size": 32, "symmetric": True}
"""Usual INT4/INT8 settings (ONNX Runtime GenAI's builder uses block 32, symmetric)."""


def _options(threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return opts


prepare = graph_as_is


def build(model: ir.Model, layout: Any, workdir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Save the (possibly weight-quantized) decoder graph; the session opens at load."""
    workdir.mkdir(parents=True, exist_ok=True)
    shared = any(n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft" for n in model.graph)
    files = save_model(model, workdir / MODEL_FILE, external=True)  # mapped at load: no second copy
    return {"model_file": MODEL_FILE, "files": files, "kv_cache": "shared" if shared else "concat", **settings}


class OrtDecoder:
    """An ONNX Runtime session over the decoder graph and the running batch's cache."""

    def __init__(
        self, folder: Path, config: dict[str, Any], layout: Any, vet: Callable[[Path], Any] = _safety.check_onnx_file
    ) -> None:
        import onnxruntime as ort

        path = Path(folder) / config["model_file"]
        vet(path)  # an ONNX file's graph and external data locations, or an ORT-format file's header
        try:
            self.session = ort.InferenceSession(
                str(path), _options(config.get("threads", 1)), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise AdapterError(
                f"ONNX Runtime could not open the decoder '{path}': {str(exc).splitlines()[0][:400]}"
            ) from exc
        self.ort = ort
        self.layout = layout
        self.past_names = layout.past_names()
        self.present_names = layout.present_names()
        self.shared = config.get("kv_cache") == "shared"
        self.arrays: list[np.ndarray] = []
        self.cache: list[Any] = []
        self.capacity = 0

    def start(self, batch: int, capacity: int) -> None:
        """Allocate the cache: ``capacity`` positions per row (shared) or an empty past (concat)."""
        shape = self.layout.cache_shape(batch, capacity if self.shared else 0)
        # one array per layer and part: an OrtValue from numpy wraps the array's memory
        self.arrays = [np.zeros(shape, np.float32) for _ in self.past_names]
        self.cache = [self.ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays]
        self.capacity = capacity

    def step(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, last_only: bool = False
    ) -> np.ndarray:
        if self.shared and attention_mask.shape[1] > self.capacity:
            raise AdapterError(
                f"The decoder step needs {attention_mask.shape[1]} cache positions; start() allocated {self.capacity}.",
                "Start the generation with the whole context (prompt + new tokens) as its capacity.",
            )
        outputs = self.run_bound(input_ids, attention_mask, position_ids, self.cache, self.shared)
        if not self.shared:
            self.cache = outputs[1:]
        logits = outputs[0].numpy()
        return logits[:, -1:] if last_only else logits

    def run_bound(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                  cache: list[Any], shared: bool) -> list[Any]:  # fmt: skip
        """One step with I/O binding: ``cache`` (an OrtValue per past input) bound as the pasts and,
        when ``shared``, as the presents too (the kernel writes the new positions in place);
        returns the outputs (logits first) as OrtValues."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, np.int64))
        binding.bind_output("logits", "cpu")
        for past, present, value in zip(self.past_names, self.present_names, cache):
            binding.bind_ortvalue_input(past, value)
            if shared:
                binding.bind_ortvalue_output(present, value)
            else:
                binding.bind_output(present, "cpu")
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:
            raise AdapterError(f"ONNX Runtime failed in a decoder step: {str(exc).splitlines()[0][:400]}") from exc
        return binding.get_outputs()

    def slots(self, count: int, capacity: int) -> OrtSlots:
        """``count`` rows of ``capacity`` positions that requests join and leave (continuous batching)."""
        return OrtSlots(self, count, capacity)


class OrtSlots:
    """Rows of one KV buffer that requests join and leave between steps (continuous batching).

    Needs the shared buffer (``kv_cache: shared``: ``GroupQueryAttention`` writes the new
    positions at ``[T - seq, T)`` of its row, ``T`` the attention-mask width). Rows are kept
    aligned on a common width ``T`` (a left-padded batch whose padding is masked): a request
    is prefilled alone into its row (its prompt written at ``[T - L, T)``, the positions
    before it masked), every decode step runs the active rows ``[0, n)`` together, and a
    finished row is replaced by the last one (its cache rows copied), so the active rows stay
    a contiguous view of the buffer. ``shift`` moves every active row's cache along the
    positions (a longer prompt arriving, or room made at the end of the buffer).
    """

    def __init__(self, decoder: OrtDecoder, slots: int, capacity: int) -> None:
        if not decoder.shared:
            raise AdapterError(
                "This ONNX Runtime decoder concatenates its cache (its attention did not fuse to "
                "GroupQueryAttention), so requests cannot join a running batch."
            )
        self.decoder, self.slots, self.capacity = decoder, slots, capacity
        shape = decoder.layout.cache_shape(slots, capacity)
        self.arrays = [np.zeros(shape, np.float32) for _ in decoder.past_names]

    def _run(self, rows: slice, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        d = self.decoder
        views = [d.ort.OrtValue.ortvalue_from_numpy(array[rows]) for array in self.arrays]  # rows: the outer axis
        return d.run_bound(ids, mask, positions, views, shared=True)[0].numpy()[:, -1]

    def prefill(self, row: int, prompt: np.ndarray, mask: np.ndarray, start: int = 0) -> np.ndarray:
        """Write ``prompt`` (the prompt's tokens from position ``start`` on: a chunk) into ``row``
        at the end of ``mask``'s width; its last logits (vocab,)."""
        positions = np.arange(start, start + len(prompt), dtype=np.int64)[None]
        return self._run(slice(row, row + 1), np.asarray(prompt, np.int64)[None], mask[None], positions)[0]

    def shift_row(self, row: int, start: int, length: int, by: int) -> None:
        """Move positions ``[start, start + length)`` of one row by ``by``."""
        for array in self.arrays:
            array[row, :, start + by : start + by + length] = array[row, :, start : start + length].copy()

    def decode(self, tokens: np.ndarray, masks: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One token for each of the first ``len(tokens)`` rows; their logits (rows, vocab)."""
        n = len(tokens)
        return self._run(slice(0, n), tokens.reshape(n, 1), masks, positions.reshape(n, 1))

    def move(self, source: int, target: int) -> None:
        for array in self.arrays:
            array[target] = array[source]

    def shift(self, rows: int, width: int, by: int) -> None:
        """Move positions ``[0, width)`` of the first ``rows`` rows by ``by`` (right if positive)."""
        for array in self.arrays:
            if by > 0:
                array[:rows, :, by : by + width] = array[:rows, :, :width].copy()
            else:
                array[:rows, :, : width + by] = array[:rows, :, -by:width].copy()


def load(folder: Path, config: dict[str, Any], layout: Any) -> OrtDecoder:
    return OrtDecoder(folder, config, layout)
