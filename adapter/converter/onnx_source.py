"""ONNX files as a source: vetted before opening, referenced by ONNX Runtime unoptimised."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from adapter.converter.imported import ImportedModel
from adapter.core import safety as _safety
from adapter.core.errors import SourceError
from adapter.core.specs import DEFAULT_DIM_MAX, Dim, TensorSpec
from adapter.core.verify import random_inputs


def _data_files(path: Path) -> list[Path]:
    import onnx

    proto = _safety.check_onnx_file(path)
    files = set()
    for tensor in _safety._iter_tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in tensor.external_data}["location"]
            files.add(_safety.check_external_data_location(location, path.parent, path))
    return sorted(files)


def source_files(path: Path) -> list[str]:
    """The ONNX file and its (vetted) external-data files."""
    if not path.is_file():
        raise SourceError(f"'{path}' does not exist.", "Check the path of the .onnx file.")
    return [str(path)] + [str(p) for p in _data_files(path)]


def onnx_digest(path: Path) -> str:
    """Hash the ONNX file and every external-data file it uses (after vetting them)."""
    if not path.is_file():
        raise SourceError(f"'{path}' does not exist.", "Check the path of the .onnx file.")
    digest = hashlib.sha256()
    for file in [path, *_data_files(path)]:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


EXAMPLE_BYTES_MAX = 2**30
"""Largest fixed-shape input (bytes) adapter draws example inputs for: verification and
calibration run the model on such inputs, so a larger declared input is refused up front
instead of exhausting the machine's memory."""


def _numpy_dtype(value: ir.Value, path: Path) -> np.dtype:
    try:
        return np.dtype(value.dtype.numpy())
    except (TypeError, ValueError, AttributeError) as exc:
        raise SourceError(
            f"'{path}': input '{value.name}' has element type {value.dtype!r}, which has no array type to feed it with.",
            "Declare the input with a concrete numeric or boolean type (float, int64, bool, ...).",
        ) from exc


def _check_example_size(value: ir.Value, dims: list[int | Dim], dtype: np.dtype, path: Path) -> None:
    shape = "(" + ", ".join(str(d) if isinstance(d, int) else d.name for d in dims) + ")"
    if any(isinstance(d, int) and d < 0 for d in dims):
        raise SourceError(f"'{path}': input '{value.name}' declares a negative dimension: {shape}.")
    elements = 1
    for d in dims:
        elements *= d if isinstance(d, int) else min(max(2, d.min), d.max)  # verify's example size
    if elements * dtype.itemsize > EXAMPLE_BYTES_MAX:
        raise SourceError(
            f"'{path}': input '{value.name}' declares shape {shape}: {elements:,} elements "
            f"({elements * dtype.itemsize / 2**30:.1f} GiB), over the {EXAMPLE_BYTES_MAX // 2**30} GiB adapter "
            "allocates for one example input to verify the conversion.",
            "Check the declared shape; make the large axes dynamic (symbolic) in the ONNX file, "
            "and give their sizes with --dynamic.",
        )


def _input_specs(model: ir.Model, dynamic: dict[str, dict[int, Dim]], path: Path) -> list[TensorSpec]:
    names = {d.name: d for axes in dynamic.values() for d in axes.values()}
    initializers = set(model.graph.initializers)
    specs = []
    for value in model.graph.inputs:
        if value.name in initializers:
            continue
        if value.shape is None or value.dtype is None:
            raise SourceError(
                f"'{path}': input '{value.name}' has no declared type or shape.",
                "Give the model's inputs full type information.",
            )
        dims: list[int | Dim] = []
        for axis, d in enumerate(value.shape):
            user = dynamic.get(value.name, {}).get(axis)
            if isinstance(d, int):
                if user is not None:
                    raise SourceError(
                        f"--dynamic makes axis {axis} of '{value.name}' dynamic, but '{path}' fixes it to {d}.",
                        "Re-export the model with that axis dynamic.",
                    )
                dims.append(d)
            else:
                label = str(d.value) if d.value is not None else f"{value.name}_{axis}"
                dims.append(user or names.get(label) or Dim(label, 1, DEFAULT_DIM_MAX))
        dtype = _numpy_dtype(value, path)
        _check_example_size(value, dims, dtype, path)
        specs.append(TensorSpec(value.name, dtype.name, tuple(dims)))
    return specs


def import_onnx(path: Path, dynamic: dict[str, dict[int, Dim]], digest: str):
    """Load a vetted ONNX file as an ImportedModel referenced by unoptimised ONNX Runtime."""
    import onnxruntime as ort

    start = time.perf_counter()
    _data_files(path)
    try:
        model = ir.load(str(path))
    except Exception as exc:
        raise SourceError(f"'{path}' could not be read as an ONNX model: {exc}") from exc
    inputs = _input_specs(model, dynamic, path)
    outputs = [
        TensorSpec(
            v.name,
            v.dtype.numpy().name if v.dtype else "float32",
            tuple(d if isinstance(d, int) else Dim(str(d)) for d in (v.shape or [])),
        )
        for v in model.graph.outputs
    ]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    holder: dict[str, ort.InferenceSession] = {}

    def reference(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "session" not in holder:
            holder["session"] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in outputs]
        return dict(zip(names, holder["session"].run(names, feed)))

    examples = random_inputs(inputs, None, np.random.default_rng(0))
    return ImportedModel(
        model=model,
        kind="onnx",
        source=str(path),
        digest=digest,
        inputs=inputs,
        outputs=outputs,
        example_inputs=examples,
        reference=reference,
        reference_kind="ONNX Runtime with graph optimizations off, on the source file",
        seconds={"load": time.perf_counter() - start},
    )
