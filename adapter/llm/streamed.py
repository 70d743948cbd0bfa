"""A decoder graph whose weights are read from the checkpoint only when an engine file is written.

For models bigger than the converting process: the model is built from its ``config.json`` on
PyTorch's meta device (no weight memory), exported like any decoder (:mod:`adapter.llm.export`,
with meta example inputs), and every initializer of the graph becomes an ``onnx_ir.LazyTensor``
that reads its tensor from the folder's safetensors shards when it is saved — with plain
reads at the header's offsets (:class:`SafetensorsIndex`), no mapping of the whole file.
Transposes of weights (``nn.Linear`` exports ``MatMul(x, Transpose(W))``) become lazy
initializers too, before any pass could fold them in memory. The buffers that are no
checkpoint tensors (rotary frequencies) are computed by building the model again with its
parameters on the meta device and its buffers on the CPU.

So a rank's engine files are written tensor by tensor: the process holds one tensor (and its
slice) at a time, whatever the model's size.
"""

from __future__ import annotations

__all__ = ["CheckpointTensor", "SafetensorsIndex", "export_streamed"]

import contextlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from adapter.core.errors import SourceError, UnsafeSourceError
from adapter.llm.export import export_decoder
from adapter.llm.families import FAMILIES, family_of_config
from adapter.llm.layout import DecoderLayout
from adapter.passes.tensor_parallel_ranks import lazy_parts, take_parts

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}  # fmt: skip
_MAX_HEADER = 100 * 2**20


class SafetensorsIndex:
    """The tensors of a folder's ``*.safetensors`` files: name → (file, dtype, shape, byte range).

    Headers are checked before anything is read (offsets inside the file, sizes that match the
    shapes, files inside the folder); tensors are read with ``seek`` + ``read`` one at a time.

    Raises:
        UnsafeSourceError: No safetensors file, or a header that does not describe its file.
    """

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder).resolve()
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise UnsafeSourceError(
                f"Folder '{folder}' has no safetensors weights.",
                "adapter loads Hugging Face weights only from safetensors; pickled checkpoints are never opened.",
            )
        self.entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        for path in files:
            if not path.resolve().is_relative_to(self.folder):
                raise UnsafeSourceError(f"'{path}' points outside the model folder '{folder}'.")
            self._read_header(path.resolve())

    def _read_header(self, path: Path) -> None:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < length <= min(_MAX_HEADER, size - 8):
                raise UnsafeSourceError(f"'{path.name}' is not a safetensors file (header length {length}).")
            try:
                header = json.loads(handle.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise UnsafeSourceError(f"'{path.name}' has an unreadable safetensors header: {exc}.") from exc
        base = 8 + length
        for name, entry in header.items() if isinstance(header, dict) else ():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (start, end) = (
                    entry["dtype"],
                    tuple(int(d) for d in entry["shape"]),
                    entry["data_offsets"],
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise UnsafeSourceError(f"'{path.name}': the entry of '{name}' is malformed.") from exc
            width = np.dtype(_DTYPES[dtype]).itemsize if dtype in _DTYPES else 0
            if (not width or min(shape, default=0) < 0 or not 0 <= start <= end <= size - base
                    or end - start != width * int(np.prod(shape, dtype=np.int64))):  # fmt: skip
                raise UnsafeSourceError(
                    f"'{path.name}': tensor '{name}' ({dtype}{list(shape)}) does not fit its bytes."
                )
            self.entries[name] = (path, dtype, shape, base + start, base + end)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """One tensor (or its ``rows`` range along the first axis), floats as float32 (BF16 and FP16 widened)."""
        path, dtype, shape, start, end = self.entries[name]
        if rows is not None:
            row = (end - start) // max(shape[0], 1)
            start, end = start + rows[0] * row, start + rows[1] * row
            shape = (rows[1] - rows[0], *shape[1:])
        with open(path, "rb") as handle:
            handle.seek(start)
            data = handle.read(end - start)
        array = np.frombuffer(data, dtype=_DTYPES[dtype]).reshape(shape)
        if dtype == "BF16":
            return (array.astype(np.uint32) << 16).view(np.float32)
        if dtype in ("F16", "F64"):
            return array.astype(np.float32)
        return array


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built here register their parameters on the meta device, their buffers as usual."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _models(folder: Path):
    """(the model entirely on meta, its buffers computed on the CPU, family, config dict)."""
    import transformers

    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"Folder '{folder}' has no readable config.json ({exc}).") from exc
    family = family_of_config(config)
    if family is None:
        raise SourceError(f"'{folder}' is no decoder family adapter exports.", f"Supported: {', '.join(FAMILIES)}.")
    hf_config = getattr(transformers, FAMILIES[family]).from_pretrained(str(folder), local_files_only=True)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    with _parameters_on_meta():
        buffers = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    return model.eval(), {name: b.detach().clone() for name, b in buffers.named_buffers()}, family


def _tensor_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """Each parameter's names (tied weights have several: the checkpoint may hold any one)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {name: group for group in names.values() for name in group}


class CheckpointTensor(ir.LazyTensor):
    """A checkpoint weight, maybe transposed, maybe cut to some ranges of one axis; read when saved.

    A cut along the checkpoint's first axis (the output features of ``nn.Linear`` weights:
    column-parallel products, vocabulary-split tables) reads only those rows from the file;
    any other cut reads the tensor, then keeps the ranges.
    """

    def __init__(self, index: SafetensorsIndex, key: str, perm: tuple[int, ...] | None = None,
                 cut: tuple[int, list[tuple[int, int]]] | None = None, name: str | None = None) -> None:  # fmt: skip
        self.index, self.key, self.perm, self.cut = index, key, perm, cut
        stored = list(index.entries[key][2])
        dims = [stored[p] for p in perm] if perm else stored
        if cut is not None:
            dims[cut[0]] = sum(b - a for a, b in cut[1])
        super().__init__(self._load, ir.DataType.FLOAT, ir.Shape(dims), name=name)

    def transposed(self, perm: tuple[int, ...], name: str) -> CheckpointTensor:
        if self.perm is not None or self.cut is not None:
            raise ValueError("only a checkpoint tensor as stored is transposed lazily")
        return CheckpointTensor(self.index, self.key, perm, None, name)

    def sliced(self, axis: int, parts: list[tuple[int, int]]) -> ir.LazyTensor:
        """The ranges ``parts`` of ``axis`` (what tensor parallelism keeps of this weight)."""
        if self.cut is not None:
            return lazy_parts(self, axis, parts)
        return CheckpointTensor(self.index, self.key, self.perm, (axis % len(self.shape), parts), self.name)

    def _load(self) -> ir.TensorProtocol:
        stored_axis = None
        if self.cut is not None:
            stored_axis = self.perm[self.cut[0]] if self.perm else self.cut[0]
        if stored_axis == 0:  # rows of the file: read only them
            array = np.concatenate([self.index.read(self.key, (a, b)) for a, b in self.cut[1]], axis=0)
            array = np.transpose(array, self.perm) if self.perm else array
        else:
            array = self.index.read(self.key)
            array = np.transpose(array, self.perm) if self.perm else array
            if self.cut is not None:
                array = take_parts(array, *self.cut)
        return ir.tensor(np.ascontiguousarray(array, dtype=np.float32))


def export_streamed(folder: Path | str) -> tuple[ir.Model, DecoderLayout, dict[str, float], SafetensorsIndex]:
    """The decoder graph of a Hugging Face folder, its weights lazy (see the module docstring).

    Raises:
        SourceError: Not a decoder folder adapter exports, or a weight missing from the checkpoint.
        UnsafeSourceError: No safetensors weights, or a malformed one.
    """
    folder = Path(folder)
    index = SafetensorsIndex(folder)
    model, buffers, family = _models(folder)
    graph, layout, seconds = export_decoder(model, family, device="meta")
    aliases = _tensor_names(model)
    missing = []
    for name, value in list(graph.graph.initializers.items()):
        key = name.removeprefix("model.")
        if key in buffers:
            value.const_value = ir.tensor(buffers[key].numpy(), name=name)
            continue
        found = next((k for k in aliases.get(key, [key]) if k in index), None)
        if found is None:
            missing.append(key)
            continue
        value.const_value = CheckpointTensor(index, found, name=name)
    if missing:
        raise SourceError(f"The checkpoint of '{folder}' lacks {len(missing)} weights: {', '.join(missing[:6])}.")
    _fold_weight_transposes(graph)
    return graph, layout, seconds, index


def _fold_weight_transposes(model: ir.Model) -> None:
    """``Transpose(W)`` of a lazy initializer → a lazy initializer of the transposed weight."""
    graph = model.graph
    for node in list(graph):
        source = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        tensor = source.const_value if source is not None and source.is_initializer() else None
        if not isinstance(tensor, CheckpointTensor) or tensor.perm is not None:
            continue
        perm = node.attributes["perm"].value if "perm" in node.attributes else list(reversed(range(len(tensor.shape))))
        out = node.outputs[0]
        name = f"{source.name}.T"
        lazy = tensor.transposed(tuple(perm), name)
        folded = ir.Value(name=name, shape=lazy.shape, type=source.type, const_value=lazy)
        graph.register_initializer(folded)
        ir.convenience.replace_all_uses_with(out, folded, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        if not source.uses() and not source.is_graph_output():
            graph.initializers.pop(source.name, None)
