"""TVM generation engines: fixed-shape decode and prefill programs over a sliding cache window.

TVM's ONNX importer follows no symbolic shape arithmetic (the exported decoder's past
length reaches a ``Reshape`` as a value, not a tensor), so the decoder is specialised to
fixed shapes twice from the same graph and built as one Relax module with two functions:

* ``decode``: ``batch`` rows x 1 new token over a past of ``window`` cache slots;
* ``prefill``: ``batch`` rows x ``chunk`` new tokens over the same window.

The weights are the functions' parameters, not constants: one copy in the artifact
(``decoder.onnx``'s external data, read at load) for both functions. Each function returns
the logits and, per layer and part, the next window: the present cache with as many slots
dropped on the left as tokens came in (a ``Slice`` added before the import, so on a GPU the
cache never leaves the device between steps; it is one device-side copy of the window per
step, the price of fixed shapes).

The session keeps, per row, which window slots hold a token (the mask the graph reads);
empty slots are masked like a left-padded batch's padding, and rotary positions come from
``position_ids``, not from slots, so shifting the window changes no numerics. A prompt runs
as left-padded chunks of ``chunk`` tokens; a batch runs in groups of ``batch`` rows, the
last one padded. A step that would push a token out of the window is refused (the window
is the model's whole context unless the build said otherwise).

The target is the profile's ``[backends.tvm]`` table (``rocm``/``cuda``/``llvm``): for a
GPU the artifact carries ``lib.so`` and the kernels (hsaco, cubin) as the ONNX-graph
engines do; on a machine that cannot run them, the session is the same module built for
this CPU's ``llvm`` (the stand-in verification runs: every operator's import, legalisation
and numerics, not the GPU schedules). Weights: FP32 (TVM's importer reads no
``MatMulNBits``).
"""

from __future__ import annotations

__all__ = [
    "PASSES", "SOURCE", "AUTO_KINDS", "WEIGHTS", "QUANTIZE_IN_GRAPH", "WEIGHT_DEFAULTS", "TvmDecoder", "program",
    "prepare", "build", "load",
]  # fmt: skip

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from adapter.backends import _tvm_rocm
from adapter.backends import tvm as tvm_backend
from adapter.backends._kernels import attach_kernels
from adapter.backends.base import fix_shapes, graph_as_is
from adapter.core import safety as _safety
from adapter.core.errors import AdapterError
from adapter.core.onnx_io import save_model
from adapter.kernels.plan import decoder_problems
from adapter.profiles import load_profile

MODEL_FILE = "decoder.onnx"
PASSES: tuple[str, ...] = ()
"""None: TVM fuses while it legalises, and its importer reads the standard domain only."""
SOURCE = "graph"
AUTO_KINDS: frozenset[str] = frozenset({"gpu"})
"""Joins ``--backend auto`` on GPU targets that list it (where the target's default backend
is TVM, it is the only candidate: see ``adapter.llm.convert``); a CPU target takes it only
when named (``--backend tvm``): without tuning it is no rival for OpenVINO or ONNX Runtime."""
WEIGHTS = frozenset({"fp32"})
QUANTIZE_IN_GRAPH: frozenset[str] = frozenset()
WEIGHT_DEFAULTS = {"block_size": 128, "symmetric": True}
BATCH = 1
"""Rows per program call (a batch runs in groups of this many)."""
CHUNK = 32
"""New tokens per prefill call."""
FUNCTIONS = ("decode", "prefill")


def _with_window_outputs(model: ir.Model, layout: Any, new_tokens: int) -> ir.Model:
    """``model`` (fixed shapes) whose present outputs drop their first ``new_tokens`` slots."""
    graph = model.graph
    presents = set(layout.present_names())
    outputs = list(graph.outputs)
    for index, value in enumerate(outputs):
        if value.name not in presents:
            continue
        ints = {key: ir.node("Constant", [], attributes={"value": ir.tensor(np.array(v, np.int64))}, name=f"{value.name}.{key}")
                for key, v in (("starts", [new_tokens]), ("ends", [np.iinfo(np.int64).max]), ("axes", [2]))}  # fmt: skip
        for node in ints.values():
            graph.append(node)
        name = value.name
        value.name = f"{name}.whole"
        sliced = ir.node("Slice", [value, *(n.outputs[0] for n in ints.values())], name=f"{name}.window")
        sliced.outputs[0].name = name
        sliced.outputs[0].dtype = value.dtype
        graph.append(sliced)
        outputs[index] = sliced.outputs[0]
    graph.outputs.clear()
    graph.outputs.extend(outputs)
    return model


def _constants_inline(model: ir.Model, weights: set[str]) -> None:
    """Initializers of ``model`` other than ``weights`` (what folding the fixed shapes made:
    masks, ranges, shapes) as ``Constant`` nodes, so they stay constants of the program."""
    graph = model.graph
    first = next(iter(graph), None)
    for name in [n for n in graph.initializers if n not in weights]:
        value = graph.initializers.pop(name)
        constant = ir.node("Constant", [], attributes={"value": value.const_value}, name=f"{name}.constant")
        ir.convenience.replace_all_uses_with(value, constant.outputs[0])
        constant.outputs[0].name = name
        if first is None:
            graph.append(constant)
        else:
            graph.insert_before(first, constant)


def _shapes(layout: Any, batch: int, new: int, window: int) -> dict[str, list[int]]:
    shapes = {"input_ids": [batch, new], "attention_mask": [batch, window + new], "position_ids": [batch, new]}
    for name in layout.past_names():
        shapes[name] = list(layout.cache_shape(batch, window))
    return shapes


def program(model: ir.Model, layout: Any, window: int, chunk: int = CHUNK, batch: int = BATCH):
    """The Relax module: ``decode`` and ``prefill`` (see the module) with the weights as
    parameters, and the ONNX initializer names in their parameter order."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    weights = {name for name, value in model.graph.initializers.items() if value.dtype.is_floating_point()}
    functions, order = {}, None
    for name, new in zip(FUNCTIONS, (1, chunk)):
        fixed = _with_window_outputs(fix_shapes(model, _shapes(layout, batch, new, window)), layout, new)
        _constants_inline(fixed, weights)
        ir.external_data.load_to_model(fixed)  # the importer reads tensors from the proto itself
        proto = ir.serde.serialize_model(fixed)
        names = [t.name for t in proto.graph.initializer]
        if order is not None and names != order:
            raise AdapterError("TVM's decode and prefill programs folded the weights differently; they cannot share them.")
        order = names
        try:
            module = from_onnx(proto, keep_params_in_input=True)
        except Exception as exc:
            raise AdapterError(
                f"TVM's ONNX importer failed on the {name} program: {str(exc).strip().splitlines()[-1][:400]}",
                "Build this decoder with another backend (--backend onnxruntime or openvino).",
            ) from exc
        del proto, fixed
        module, _ = relax.frontend.detach_params(module)  # the values are read from decoder.onnx at load
        functions[name] = module["main"].with_attr("global_symbol", name)
    return tvm.IRModule(functions), order


prepare = graph_as_is


def build(model: ir.Model, layout: Any, workdir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Write ``decoder.onnx`` (the weights' one copy), build both programs for the profile's
    TVM target into ``lib.so`` (plus the GPU's kernels); returns the config."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    profile = load_profile(settings.get("profile", "host"))
    target = dict(tvm_backend.Options.from_profile(profile).target)
    window = int(settings.get("window") or layout.max_positions)
    chunk = min(int(settings.get("chunk") or CHUNK), window)
    files = save_model(model, workdir / MODEL_FILE, external=True)
    module, order = program(model, layout, window, chunk)
    executable = tvm_backend._compile_relax(module, target, 0, None)
    tvm_backend._export(executable, workdir / tvm_backend.LIBRARY, target)
    files.append(tvm_backend.LIBRARY)
    kind = tvm_backend._kind(target)
    if kind == "cuda":
        files += tvm_backend._cuda_kernels(executable, workdir, str(target.get("arch", "sm_80")))
    elif kind == "rocm":
        files += _tvm_rocm.save_code_objects(executable, workdir)
    # GPU targets: the Triton kernels at the programs' own shapes (a chunk's prefill, a decode over the window)
    found = decoder_problems(model, layout, prompt=chunk, context=window, batch=BATCH, past=window)
    kernels = attach_kernels(model, profile, {}, settings.get("weights", "fp32"), workdir, found)
    return {
        **settings,
        **kernels,
        "model_file": MODEL_FILE,
        "files": files + [f for k in kernels.get("triton_kernels", []) for f in k["files"]],
        "library": tvm_backend.LIBRARY,
        "target": target,
        "kv_cache": "window",
        "window": window,
        "chunk": chunk,
        "batch": BATCH,
        "params": order,
        "tvm_version": tvm_backend.version(),
        "kernels": tvm_backend._check_kernels(workdir, files, target),
    }


class TvmDecoder:
    """The two programs on their device, the weights once, and each row group's window."""

    def __init__(self, folder: Path, config: dict[str, Any], layout: Any) -> None:
        import tvm
        from tvm import relax

        folder = Path(folder)
        path = folder / config["model_file"]
        _safety.check_onnx_file(path)
        self.layout = layout
        self.window, self.chunk, self.batch = int(config["window"]), int(config["chunk"]), int(config["batch"])
        target = dict(config["target"])
        model = ir.load(path)
        if tvm_backend._runs_here(target):
            kind = tvm_backend._kind(target)
            self.device = {"llvm": tvm.cpu, "cuda": tvm.cuda, "rocm": tvm.rocm}[kind](0)
            executable = tvm.runtime.load_module(str(folder / config["library"]))
            self.stand_in = None
        else:  # the same module for this CPU: what verification runs (see the module)
            module, order = program(model, layout, self.window, self.chunk, self.batch)
            if order != list(config["params"]):
                raise AdapterError(f"'{path}' does not hold the weights its engine was built with.")
            host = tvm_backend._host_target()
            executable = tvm_backend._compile_relax(module, host, 0, None)
            self.device = tvm.cpu(0)
            self.stand_in = f"TVM {tvm_backend.version()} llvm build of the same programs for this CPU"
        self.vm = relax.VirtualMachine(executable, self.device)
        initializers = model.graph.initializers
        missing = [n for n in config["params"] if n not in initializers]
        if missing:
            raise AdapterError(f"'{path}' lacks the weights {missing[:5]} its engine was built with.")
        # np.require, not ascontiguousarray: that makes a scalar (an RMSNorm exponent) 1-d
        self.weights = [tvm.runtime.tensor(np.require(initializers[n].const_value.numpy(), requirements='C'), self.device)
                        for n in config["params"]]  # fmt: skip
        del model
        self.tvm = tvm
        self.windows: list[list[Any]] = []
        self.slots = np.zeros((0, self.window), np.int64)
        self.rows = 0

    def start(self, batch: int, capacity: int) -> None:
        """Empty windows for ``batch`` rows (in groups of the programs' batch)."""
        if capacity > self.window:
            raise AdapterError(
                f"This TVM decoder holds {self.window} cache positions per row; the generation needs {capacity}.",
                "Shorten the prompt or ask for fewer new tokens, or build the engine with a larger window.",
            )
        groups = math.ceil(batch / self.batch)
        shape = self.layout.cache_shape(self.batch, self.window)
        self.windows = [
            [self.tvm.runtime.tensor(np.zeros(shape, np.float32), self.device) for _ in self.layout.past_names()]
            for _ in range(groups)
        ]
        self.slots = np.zeros((groups * self.batch, self.window), np.int64)
        self.rows = batch

    def _padded_rows(self, array: np.ndarray) -> np.ndarray:
        extra = self.slots.shape[0] - array.shape[0]
        return np.concatenate([array, np.zeros((extra, array.shape[1]), np.int64)]) if extra else array

    def _call(self, function: str, ids: np.ndarray, new_mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        new = ids.shape[1]
        logits = []
        for group, window in enumerate(self.windows):
            rows = slice(group * self.batch, (group + 1) * self.batch)
            mask = np.concatenate([self.slots[rows], new_mask[rows]], axis=1)
            if mask[:, :new].any():
                raise AdapterError(
                    f"This step would push tokens out of the TVM decoder's {self.window}-position window.",
                    "Shorten the prompt or ask for fewer new tokens, or build the engine with a larger window.",
                )
            feed = [np.ascontiguousarray(a, np.int64) for a in (ids[rows], mask, positions[rows])]
            args = [self.tvm.runtime.tensor(a, self.device) for a in feed]
            try:
                out = self.vm[function](*args, *window, *self.weights)
            except Exception as exc:
                raise AdapterError(f"TVM failed in a decoder step: {str(exc).strip().splitlines()[-1][:400]}") from exc
            logits.append(out[0].numpy())
            self.windows[group] = [out[i] for i in range(1, len(out))]
            self.slots[rows] = mask[:, new:]
        return np.concatenate(logits)

    def step(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, last_only: bool = False
    ) -> np.ndarray:
        new = input_ids.shape[1]
        ids, mask, positions = (self._padded_rows(np.asarray(a, np.int64)[:, -new:])
                                for a in (input_ids, attention_mask, position_ids))  # fmt: skip
        if new == 1:
            logits = self._call("decode", ids, mask, positions)
        else:  # left-padded to whole chunks: the padding is masked like an empty slot
            pad = -new % self.chunk
            ids, mask, positions = (np.pad(a, ((0, 0), (pad, 0))) for a in (ids, mask, positions))
            parts = [self._call("prefill", *(a[:, i : i + self.chunk] for a in (ids, mask, positions)))
                     for i in range(0, ids.shape[1], self.chunk)]  # fmt: skip
            logits = np.concatenate(parts, axis=1)[:, pad:]
        logits = logits[: self.rows]
        return logits[:, -1:] if last_only else logits


def load(folder: Path, config: dict[str, Any], layout: Any) -> TvmDecoder:
    return TvmDecoder(folder, config, layout)
