"""Bench suite files: the YAML schema, its checks and the cases it expands to.

A suite lists models × targets × precisions × batch sizes (see :mod:`adapter.bench.runner` for
an example); :func:`load_suite` checks every key and expands the lists into one
:class:`Case` per timed engine, each with a unique name.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter.core.errors import AdapterError, SourceError
from adapter.core.timing import STATISTICS

_SUITE_KEYS = {
    "name",
    "repeats",
    "iterations",
    "warmup",
    "settle_s",
    "guard_s",
    "statistic",
    "backend",
    "threads",
    "seq",
    "cases",
}
_CASE_KEYS = {
    "model",
    "name",
    "targets",
    "precisions",
    "batch_sizes",
    "seq",
    "backend",
    "threads",
    "dynamic",
    "inputs",
}


@dataclass(frozen=True)
class Case:
    """One timed engine: a model on a target at a precision, batch size and sequence length."""

    name: str
    model: str
    target: str = "host"
    precision: str = "fp32"
    batch: int = 1
    seq: int | None = None
    backend: str | None = None
    threads: int = 0
    dynamic: tuple[str, ...] = ()
    inputs: str | None = None
    """An .npz feed to resize to batch/seq instead of the source's example inputs."""


@dataclass
class Suite:
    """A parsed suite file."""

    name: str
    path: Path
    cases: list[Case]
    repeats: int = 5
    iterations: int = 20
    warmup: int = 3
    settle_s: float = 10.0
    guard_s: float = 30.0
    statistic: str = "min"
    digest: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _positive(value: Any, what: str, where: str, zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero else 1):
        raise SourceError(f"{where}: {what} must be a {'non-negative' if zero else 'positive'} integer, not {value!r}.")
    return value


def _seconds(value: Any, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 600:
        raise SourceError(f"{where}: {what} must be a number of seconds from 0 to 600, not {value!r}.")
    return float(value)


def _str_list(value: Any, what: str, where: str) -> list[str]:
    items = [value] if isinstance(value, (str, int)) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, (str, int)) for v in items):
        raise SourceError(f"{where}: {what} must be a name or a non-empty list of them, not {value!r}.")
    return [str(v) for v in items]


def _model_label(model: str) -> str:
    return model.rstrip("/").rpartition(":")[2] if ":" in model else Path(model.rstrip("/")).stem


def load_suite(path: Path | str, threads: int | None = None) -> Suite:
    """Read and check a suite file; ``threads`` overrides every case's thread count.

    Raises:
        SourceError: The file is missing, not YAML, or does not follow the schema.
    """
    path = Path(path)
    try:
        import yaml
    except ImportError as exc:
        raise AdapterError("Reading a bench suite needs PyYAML.", "Install it: pip install pyyaml.") from exc
    try:
        text = path.read_text()
    except OSError as exc:
        raise SourceError(f"Cannot read the bench suite '{path}': {exc.strerror or exc}.") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SourceError(f"The bench suite '{path}' is not valid YAML: {exc}".rstrip(".") + ".") from exc
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list) or not data["cases"]:
        raise SourceError(f"The bench suite '{path}' needs a mapping with a non-empty 'cases' list.")
    unknown = sorted(set(data) - _SUITE_KEYS)
    if unknown:
        raise SourceError(
            f"The bench suite '{path}' has unknown keys: {', '.join(unknown)}.", f"Known: {sorted(_SUITE_KEYS)}."
        )
    where = str(path)
    suite = Suite(
        name=str(data.get("name") or path.stem),
        path=path,
        cases=[],
        repeats=_positive(data.get("repeats", 5), "repeats", where),
        iterations=_positive(data.get("iterations", 20), "iterations", where),
        warmup=_positive(data.get("warmup", 3), "warmup", where, zero=True),
        settle_s=_seconds(data.get("settle_s", 10), "settle_s", where),
        guard_s=_seconds(data.get("guard_s", 30), "guard_s", where),
        statistic=str(data.get("statistic", "min")),
        digest=hashlib.sha256(text.encode()).hexdigest()[:16],
    )
    if suite.statistic not in STATISTICS:
        raise SourceError(f"{where}: statistic must be one of {', '.join(STATISTICS)}, not {suite.statistic!r}.")
    names: set[str] = set()
    for index, entry in enumerate(data["cases"]):
        at = f"{path}, case {index + 1}"
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise SourceError(f"{at}: each case needs a 'model' (a factory, Hugging Face folder, .pt2 or .onnx).")
        unknown = sorted(set(entry) - _CASE_KEYS)
        if unknown:
            raise SourceError(f"{at}: unknown keys {', '.join(unknown)}.", f"Known: {sorted(_CASE_KEYS)}.")
        merged = {k: data[k] for k in ("backend", "threads", "seq") if k in data} | entry
        seq = merged.get("seq")
        seq = None if seq is None else _positive(seq, "seq", at)
        case_threads = _positive(merged.get("threads", 0), "threads", at, zero=True) if threads is None else threads
        batches = merged.get("batch_sizes", [1])
        batches = [batches] if isinstance(batches, int) else batches
        if not isinstance(batches, list) or not batches:
            raise SourceError(f"{at}: batch_sizes must be a positive integer or a list of them.")
        dynamic = _str_list(merged["dynamic"], "dynamic", at) if merged.get("dynamic") else []
        label = str(merged.get("name") or _model_label(merged["model"]))
        for target in _str_list(merged.get("targets", ["host"]), "targets", at):
            for precision in _str_list(merged.get("precisions", ["fp32"]), "precisions", at):
                for batch in batches:
                    batch = _positive(batch, "each batch size", at)
                    name = f"{label} {target} {precision} b{batch}" + (f" s{seq}" if seq else "")
                    if name in names:
                        raise SourceError(f"{at}: case '{name}' is listed twice.", "Give one of them a 'name'.")
                    names.add(name)
                    suite.cases.append(
                        Case(
                            name,
                            merged["model"],
                            target,
                            precision,
                            batch,
                            seq,
                            merged.get("backend"),
                            case_threads,
                            tuple(dynamic),
                            merged.get("inputs"),
                        )
                    )
    return suite
