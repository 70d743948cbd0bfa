"""Calibration data and per-tensor value ranges.

Sources: an ``.npz`` file (one feed: an array per input name), a folder of them, a text
file tokenized with the model's own tokenizer (one sample per line), or — with a
printed warning — synthetic inputs drawn like the example inputs. Ranges (min/max,
absolute-value histogram, percentiles, FP16 overflow/underflow counts) are measured
with ONNX Runtime over every float tensor of the graph and cached per model + data.
"""

from __future__ import annotations

__all__ = ["CalibrationSet", "TensorRange", "load_calibration", "synthetic_calibration", "collect_ranges", "probe_session"]

import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapter.core.errors import InputMismatchError, SourceError
from adapter.core.specs import TensorSpec, check_inputs
from adapter.core.verify import random_inputs

FP16_MAX = 65504.0
FP16_TINY = 5.96e-8
"""Smallest FP16 subnormal: non-zero values below it become zero in FP16."""
_BINS = np.arange(-40, 41, dtype=np.float64)  # log2 |x| bin edges


@dataclass
class CalibrationSet:
    """Calibration feeds plus where they came from."""

    samples: list[dict[str, np.ndarray]]
    source: str
    synthetic: bool

    def digest(self) -> str:
        """sha256 over every array (names, dtypes, shapes, bytes)."""
        h = hashlib.sha256(self.source.encode())
        for feed in self.samples:
            for name in sorted(feed):
                value = np.ascontiguousarray(feed[name])
                h.update(f"{name}{value.dtype}{value.shape}".encode())
                h.update(value.tobytes())
        return h.hexdigest()

    def split(self) -> tuple[list[dict], list[dict]]:
        """Calibration and held-out samples: alternate samples, so an ordered file (by
        length or topic) gives both halves the same mix."""
        if len(self.samples) < 2:
            return self.samples, self.samples
        return self.samples[0::2], self.samples[1::2]


def _read_npz(path: Path, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            feed = {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError) as exc:
        raise SourceError(f"Calibration file '{path}' is not a readable .npz of arrays ({exc}).") from exc
    try:
        return check_inputs(specs, feed)
    except InputMismatchError as exc:
        raise SourceError(f"Calibration file '{path}' does not match the model: {exc.message}", exc.hint) from exc


def _tokenize_lines(path: Path, tokenizer: Any, specs: list[TensorSpec], limit: int) -> list[dict[str, np.ndarray]]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise SourceError(f"Calibration text '{path}' has no non-empty lines.")
    names = {s.name: s for s in specs}
    samples = []
    for line in lines[:limit]:
        encoded = tokenizer(line, return_tensors="np", truncation=True)
        feed = {}
        for name, spec in names.items():
            if name not in encoded:
                raise SourceError(
                    f"The tokenizer gives {', '.join(encoded)} but the model also needs '{name}'.",
                    "Use --calib with an .npz file instead.",
                )
            feed[name] = np.asarray(encoded[name]).astype(spec.dtype)
        samples.append(check_inputs(specs, feed))
    return samples


def load_calibration(
    path: Path, specs: list[TensorSpec], *, tokenizer: Any = None, limit: int = 512
) -> CalibrationSet:
    """Load calibration feeds from an .npz file, a folder of .npz files, or a text file.

    Raises:
        SourceError: Missing or unreadable data, or feeds that do not match the model.
    """
    path = Path(path)
    if not path.exists():
        raise SourceError(f"Calibration data '{path}' does not exist.")
    if path.is_dir():
        files = sorted(path.glob("*.npz"))[:limit]
        if not files:
            raise SourceError(f"Calibration folder '{path}' holds no .npz files.")
        return CalibrationSet([_read_npz(f, specs) for f in files], str(path), False)
    if path.suffix == ".npz":
        return CalibrationSet([_read_npz(path, specs)], str(path), False)
    if path.suffix == ".txt":
        if tokenizer is None:
            raise SourceError(
                f"Calibration text '{path}' needs the model's tokenizer, and this source has none.",
                "Convert a Hugging Face folder, give the factory's module a `tokenizer` attribute, or use --calib.",
            )
        return CalibrationSet(_tokenize_lines(path, tokenizer, specs, limit), f"text:{path}", False)
    raise SourceError(f"Calibration data '{path}' is neither .npz, a folder of .npz, nor .txt.")


def synthetic_calibration(
    specs: list[TensorSpec], examples: dict[str, np.ndarray], count: int = 16
) -> CalibrationSet:
    """Random feeds drawn like the example inputs (accuracy figures then only indicative)."""
    rng = np.random.default_rng(1234)
    samples = [examples] + [random_inputs(specs, examples, rng) for _ in range(count - 1)]
    return CalibrationSet(samples, "synthetic", True)


@dataclass
class TensorRange:
    """Value statistics of one tensor over the calibration set."""

    min: float
    max: float
    absmax: float
    count: int
    nonzero_underflow: int
    overflow: int
    hist: list[int]

    def percentile(self, q: float) -> float:
        """Approximate ``q``-th percentile of |x| from the log2 histogram (upper bin edge)."""
        total = sum(self.hist)
        if not total:
            return 0.0
        acc = 0
        for index, n in enumerate(self.hist):
            acc += n
            if acc >= total * q / 100:
                return float(2.0 ** _BINS[min(index + 1, len(_BINS) - 1)])
        return self.absmax

    @property
    def overflows_fp16(self) -> bool:
        return self.absmax > FP16_MAX

    @property
    def underflow_share(self) -> float:
        return self.nonzero_underflow / self.count if self.count else 0.0


def _merge(stats: dict[str, dict[str, Any]], name: str, value: np.ndarray) -> None:
    v = value.astype(np.float64, copy=False).ravel()
    finite = v[np.isfinite(v)]
    a = np.abs(finite)
    slot = stats.setdefault(name, {"min": np.inf, "max": -np.inf, "count": 0, "under": 0, "over": 0, "hist": np.zeros(len(_BINS) - 1, np.int64)})
    if finite.size:
        slot["min"] = min(slot["min"], float(finite.min()))
        slot["max"] = max(slot["max"], float(finite.max()))
    slot["count"] += int(v.size)
    slot["under"] += int(np.count_nonzero((a > 0) & (a < FP16_TINY)))
    slot["over"] += int(np.count_nonzero(a > FP16_MAX)) + int(v.size - finite.size)
    nz = a[a > 0]
    if nz.size:
        slot["hist"] += np.histogram(np.clip(np.log2(nz), _BINS[0], _BINS[-1] - 1e-9), bins=_BINS)[0]


def probe_session(model, names, optimize: bool = False):
    """An ONNX Runtime CPU session over a copy of ``model`` (an ``onnx_ir`` model or a
    ModelProto) whose outputs also expose the intermediate tensors ``names`` (each once,
    after the model's own outputs).

    ``optimize`` keeps ONNX Runtime's graph optimisation on, so the fused kernels an engine
    runs are what is measured; off (the default), every tensor is computed as the graph says.
    """
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    if isinstance(model, ir.Model):  # the boundary: ONNX Runtime takes a serialized model
        probe = ir.serde.serialize_model(model)
    else:
        probe = onnx.ModelProto.FromString(model.SerializeToString())
    present = {o.name for o in probe.graph.output}
    for name in names:
        if name and name not in present:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
            present.add(name)
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])


def collect_ranges(model_bytes, samples: list[dict[str, np.ndarray]], cache_dir: Path | None = None) -> dict[str, TensorRange]:
    """Run the model (an ``onnx_ir`` model or its serialized bytes) on every sample with all
    float tensors exposed; return their ranges.

    Results are cached in ``cache_dir`` by the hash of the model and the samples.
    """
    import onnx
    import onnx_ir as ir

    if isinstance(model_bytes, ir.Model):  # the boundary: ONNX Runtime and shape inference take bytes
        model_bytes = ir.serde.serialize_model(model_bytes).SerializeToString()
    key = hashlib.sha256(model_bytes)
    for feed in samples:
        for name in sorted(feed):
            key.update(name.encode() + np.ascontiguousarray(feed[name]).tobytes())
    cache_file = Path(cache_dir) / f"ranges-{key.hexdigest()[:24]}.json" if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        try:
            return {k: TensorRange(**v) for k, v in json.loads(cache_file.read_text()).items()}
        except (ValueError, TypeError):
            pass
    proto = onnx.load_from_string(model_bytes)
    inferred = onnx.shape_inference.infer_shapes(proto)
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    typed = {vi.name for vi in list(inferred.graph.value_info) + list(inferred.graph.output) if vi.type.tensor_type.elem_type in float_types}
    session = probe_session(proto, [out for node in proto.graph.node for out in node.output if out in typed])
    names = [o.name for o in session.get_outputs()]
    stats: dict[str, dict[str, Any]] = {}
    for init in proto.graph.initializer:
        if init.data_type in float_types:
            _merge(stats, init.name, onnx.numpy_helper.to_array(init))
    for feed in samples:
        for name, value in zip(names, session.run(names, feed)):
            if np.issubdtype(np.asarray(value).dtype, np.floating):
                _merge(stats, name, np.asarray(value))
    ranges = {
        name: TensorRange(
            min=float(s["min"]) if np.isfinite(s["min"]) else 0.0,
            max=float(s["max"]) if np.isfinite(s["max"]) else 0.0,
            absmax=float(max(abs(s["min"]), abs(s["max"]))) if np.isfinite(s["min"]) else 0.0,
            count=s["count"], nonzero_underflow=s["under"], overflow=s["over"], hist=[int(x) for x in s["hist"]],
        )
        for name, s in stats.items()
    }
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = cache_file.with_name(f".{cache_file.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps({k: asdict(v) for k, v in ranges.items()}))
        os.replace(tmp, cache_file)
    return ranges
