"""ONNX Runtime generation engines: the exported decoder run step by step with I/O binding.

Each step binds the token ids, mask and positions from numpy and the previous step's
``present`` OrtValues as this step's ``past`` inputs, so the cache never leaves ONNX
Runtime's memory and is never copied into numpy; only the logits are read back. The
graph concatenates past and new positions, so ONNX Runtime allocates each step's
present tensors from its arena (the fixed-capacity cache needs the GroupQueryAttention
fusion, not done yet). Weight-only INT4/INT8 arrive already in the graph as
``MatMulNBits`` (the driver runs ONNX Runtime's quantizer before ``build``).
"""

from __future__ import annotations

__all__ = ["WEIGHTS", "QUANTIZE_IN_GRAPH", "WEIGHT_DEFAULTS", "OrtDecoder", "build", "load"]

from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from adapter.core import safety as _safety
from adapter.core.errors import AdapterError
from adapter.core.onnx_io import save_model

MODEL_FILE = "decoder.onnx"
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


def build(model: ir.Model, layout: Any, workdir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Save the (possibly weight-quantized) decoder graph; the session opens at load."""
    workdir.mkdir(parents=True, exist_ok=True)
    files = save_model(model, workdir / MODEL_FILE)
    return {"model_file": MODEL_FILE, "files": files, **settings}


class OrtDecoder:
    """An ONNX Runtime session over the decoder graph and the running batch's cache."""

    def __init__(self, folder: Path, config: dict[str, Any], layout: Any) -> None:
        import onnxruntime as ort

        path = Path(folder) / config["model_file"]
        _safety.check_onnx_file(path)
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
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.cache: list[Any] = []
        self.capacity = 0

    def start(self, batch: int, capacity: int) -> None:
        empty = np.zeros(self.layout.cache_shape(batch, 0), np.float32)
        self.cache = [self.ort.OrtValue.ortvalue_from_numpy(empty) for _ in self.past_names]
        self.capacity = capacity

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, np.int64))
        for name, value in zip(self.past_names, self.cache):
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:
            raise AdapterError(f"ONNX Runtime failed in a decoder step: {str(exc).splitlines()[0][:400]}") from exc
        outputs = binding.get_outputs()
        self.cache = outputs[1:]
        return outputs[0].numpy()


def load(folder: Path, config: dict[str, Any], layout: Any) -> OrtDecoder:
    return OrtDecoder(folder, config, layout)
