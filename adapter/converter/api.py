"""Python API: ``convert()`` a model source to a verified engine, ``load()`` an engine."""

from __future__ import annotations

__all__ = ["ConvertOptions", "ConvertResult", "convert", "load", "default_output"]

import datetime as _dt
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from adapter.backends import BACKENDS, DEFAULT, get_backend
from adapter.converter.build import (
    AUTO,
    Candidate,
    auto_candidates,
    base_passes,
    build_candidate,
    choose,
    drop_workdirs,
)
from adapter.converter.importer import import_source, prepare_source
from adapter.converter.precision import PrecisionOptions, reached_ms, runs_natively
from adapter.converter.roofline import roofline
from adapter.core import artifact
from adapter.core.errors import AdapterError, ArtifactError
from adapter.core.onnx_io import PROTOBUF_SAFE_BYTES, initializer_bytes
from adapter.core.specs import parse_dynamic
from adapter.core.timing import median_ms
from adapter.core.tokenizer import TOKENIZER_DIR, save_tokenizer
from adapter.core.verify import Tolerance
from adapter.passes import build_pipeline, run_pipeline
from adapter.profiles import load_profile
from adapter.profiles.probe import probe_host


@dataclass(frozen=True)
class ConvertOptions:
    """Everything that shapes an engine; all of it is part of the cache key."""

    target: str = "host"
    """Target profile name or path to a profile file."""
    backend: str | None = None
    """Backend name; None takes the profile's default backend."""
    dynamic: tuple[str, ...] = ()
    """``--dynamic`` items, e.g. ``input_ids:0=batch,1=seq[1..512]``."""
    passes: tuple[str, ...] | None = None
    """Pass or pipeline names; None takes the profile's pipeline (else canonicalize)."""
    tolerance: Tolerance = Tolerance()
    """Verification criteria against the eager model."""
    verify_samples: int = 2
    """Random verification cases besides the example inputs."""
    backend_options: tuple[tuple[str, Any], ...] = ()
    """Backend option overrides as (name, value) pairs."""
    precision: PrecisionOptions = PrecisionOptions()
    """Precision mode, accuracy budget, calibration data and plan."""
    trust_source: bool = False
    """Allow a .pt2 that unpickles objects (only for files you made)."""
    benchmark: bool = True
    """Measure engine and eager latency on the example inputs for the report."""
    use_cache: bool = True
    """Reuse a cached artifact when the cache key matches."""

    def key_fields(self) -> dict[str, Any]:
        """The options that change the engine (cache key), as JSON-ready data."""
        data = asdict(self)
        for unrelated in ("use_cache", "benchmark", "target", "trust_source"):
            data.pop(unrelated)
        return data


@dataclass
class ConvertResult:
    """Where the artifact is, its manifest, and whether the cache served it."""

    path: Path
    manifest: dict[str, Any]
    cache_hit: bool
    seconds: float
    cache_note: str = ""
    stages: dict[str, float] = field(default_factory=dict)


def default_output(source: str, target: str) -> Path:
    """``<model>-<target>`` in the working folder, e.g. ``minilm-host``."""
    stem = source.rstrip("/").rpartition(":")[2] if ":" in source else Path(source.rstrip("/")).stem
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{stem}-{Path(target).stem}").strip("-.")
    return Path(clean or "engine")


def _cached(output: Path, key: str) -> tuple[Path | None, str]:
    """Find a valid artifact for ``key``: the output folder itself, then the cache."""
    if (output / artifact.MANIFEST).is_file():
        try:
            manifest = artifact.validate(output)
            if manifest.get("cache_key") == key:
                return output, "the output folder already holds this engine"
        except ArtifactError:
            pass
    entry = artifact.cache_root() / "engines" / key
    if entry.is_dir():
        try:
            artifact.validate(entry)
            return entry, f"cache entry {key[:12]}"
        except ArtifactError:
            import shutil

            shutil.rmtree(entry, ignore_errors=True)
            return None, "a corrupted cache entry was removed and the engine rebuilt"
    return None, ""


def _versions(names: list[str]) -> dict[str, str]:
    """Versions of the backends ``auto`` may use; one whose SDK is missing is left out."""
    found = {}
    for name in names:
        try:
            found[name] = get_backend(name).version()
        except AdapterError:
            continue
    return found


def _spec_identity(source: str) -> str:
    """The source string made independent of the working folder where it names files."""
    head, sep, attr = source.rpartition(":")
    if sep and head.endswith(".py"):
        return f"{Path(head).resolve()}:{attr}"
    if Path(source).exists():
        return str(Path(source).resolve())
    return f"{source}@{Path.cwd()}"


def _serve(found: Path, output: Path, note: str, started: float) -> ConvertResult:
    """Return a cached artifact, copied to ``output`` unless it is already there."""
    if found != output:
        artifact.copy_artifact(found, output)
    manifest = artifact.read_manifest(output)
    return ConvertResult(output, manifest, True, time.perf_counter() - started, note)


def _precision_records(candidate: Candidate) -> list:
    """The precision pass's record (its counters), when the candidate's precision was lowered."""
    lowered = candidate.lowered
    return [lowered.record] if lowered is not None and lowered.record is not None else []


def convert(
    source: str,
    output: Path | str | None = None,
    options: ConvertOptions = ConvertOptions(),
    progress: Callable[[str], None] | None = None,
) -> ConvertResult:
    """Convert a model source to a verified engine artifact for a target.

    Args:
        source: A factory (``file.py:fn``, ``pkg.mod:fn``), Hugging Face folder, ``.pt2``
            or ``.onnx`` file.
        output: Artifact folder; defaults to ``<model>-<target>``.
        options: Target, backend, passes, dynamic dims, tolerances.
        progress: Called with the name of each stage as it starts.

    Returns:
        The artifact's path and manifest, and whether the cache served it.

    Raises:
        AdapterError: Any user-facing failure (see ``adapter.core.errors``).
    """
    say = progress or (lambda _stage: None)
    started = time.perf_counter()
    stages: dict[str, float] = {}

    def stage(name: str) -> None:
        stages[name] = time.perf_counter()
        say(name)

    output = Path(output) if output else default_output(source, options.target)
    stage("load profile")
    profile = load_profile(options.target)
    backend_name = options.backend or getattr(profile, "default_backend", None) or DEFAULT
    names = auto_candidates(profile) if backend_name == AUTO else [backend_name]
    versions = {name: get_backend(name).version() for name in names} if backend_name != AUTO else _versions(names)
    dynamic = parse_dynamic(options.dynamic)
    passes = base_passes(profile, options.passes)
    context = {
        "format": artifact.FORMAT_VERSION,
        "options": options.key_fields(),
        "passes": passes,
        "profile": profile.digest(),
        "backend": {"name": backend_name, "versions": versions},
        "libraries": artifact.library_versions(),
        "adapter_code": artifact.code_digest(),
        "precision_files": options.precision.files_digest(),
    }
    index_key = artifact.cache_key({**context, "spec": _spec_identity(source)})
    note = "cache disabled"
    if options.use_cache:
        key = artifact.lookup_index(index_key)
        found, note = _cached(output, key) if key else (None, "")
        if found is not None:
            return _serve(found, output, note, started)
    stage("load source")
    prepared = prepare_source(source, dynamic, trust_source=options.trust_source)
    key = artifact.cache_key({**context, "source": {"kind": prepared.kind, "digest": prepared.digest}})
    if options.use_cache:
        found, slow_note = _cached(output, key)
        note = slow_note or note
        if found is not None:
            artifact.write_index(index_key, prepared.reads, key)
            return _serve(found, output, note, started)

    stage("export")
    imported = import_source(prepared)
    stage("passes")
    records = run_pipeline(imported.model, build_pipeline(passes))
    if initializer_bytes(imported.model) <= PROTOBUF_SAFE_BYTES:
        ir.external_data.load_to_model(imported.model)  # in memory: candidates and plans copy it
    canonical = imported.model
    with artifact.staging_dir(output) as staged:
        stage("build")
        candidates = []
        if options.precision.mode == "auto":  # backends with native BF16 first: their best prunes the others' search
            names = sorted(names, key=lambda n: not runs_natively("bf16", profile, BACKENDS[n]))
        for name in names:
            workdir = staged if len(names) == 1 else staged / ".candidates" / name
            reached = [ms for ms in (reached_ms(c.lowered) for c in candidates) if ms]
            try:
                candidates.append(
                    build_candidate(
                        name,
                        canonical,
                        imported,
                        profile,
                        options,
                        workdir,
                        artifact.cache_root() / "calibration",
                        say,
                        measure=options.benchmark and len(names) == 1,
                        beat_ms=min(reached, default=None),
                    )
                )
            except AdapterError as exc:
                if len(names) == 1:
                    raise
                candidates.append(Candidate(name, versions.get(name, ""), error=exc))
        best = choose(candidates, staged, imported.example_inputs)
        drop_workdirs(staged / ".candidates")
        engine, lowered, model = best.engine, best.lowered, best.model
        if lowered and lowered.budget is not None:  # the default's exact FP32 has no plan to keep
            lowered.plan.save(staged / "plan.json")
        latency = None
        if options.benchmark and engine.runs_here:
            stage("benchmark")
            engine_ms = (
                best.latency_ms
                if best.latency_ms is not None
                else median_ms(lambda: engine.run(imported.example_inputs))
            )
            latency = {
                "inputs": {k: list(v.shape) for k, v in imported.example_inputs.items()},
                "engine_ms": engine_ms,
                "reference_ms": median_ms(lambda: imported.reference(imported.example_inputs)),
                "reference": imported.reference_kind,
            }
            latency["speedup"] = latency["reference_ms"] / latency["engine_ms"]
        summaries = [c.summary(c is best) for c in candidates]
        machine = probe_host() if engine.runs_here else None  # the latencies are this machine's: its peaks
        roof = roofline(canonical, imported.inputs, imported.example_inputs, machine) if machine else None
        if roof is not None:  # each engine's latency against the machine's limit at its precision
            for summary in summaries:
                if summary.get("latency_ms"):
                    summary["roofline"] = roof.figures(summary["precision"], machine, summary["latency_ms"])
            if latency:
                latency["roofline"] = roof.figures(lowered.report["mode"] if lowered else "fp32", machine, latency["engine_ms"])
        now = time.perf_counter()
        stamps = list(stages.items()) + [("end", now)]
        timings = {name: round(stamps[i + 1][1] - t, 4) for i, (name, t) in enumerate(stamps[:-1])}
        tokenizer = None
        if imported.tokenizer is not None:  # text for `adapter serve`'s /v1/embeddings
            save_tokenizer(imported.tokenizer, staged / TOKENIZER_DIR)
            tokenizer = TOKENIZER_DIR
        manifest = {
            "adapter_version": artifact.library_versions()["adapter"],
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "cache_key": key,
            "source": {
                "spec": source,
                "kind": imported.kind,
                "digest": imported.digest,
                "reference": imported.reference_kind,
            },
            "options": {**options.key_fields(), "target": options.target, "passes": passes},
            "target": {"name": profile.name, "digest": profile.digest(), "profile": profile.to_dict()},
            "backend": {
                "name": best.name,
                "version": best.version,
                "requested": backend_name,
                "config": engine.config,
                "candidates": summaries,
            },
            "passes": [r.to_json() for r in records + best.records + _precision_records(best)],
            "graph": {"nodes": len(list(model.graph.all_nodes())), "opsets": dict(model.opset_imports)},
            "precision": lowered.report if lowered else {"mode": "fp32"},
            "inputs": [s.to_json() for s in engine.inputs],  # a fixed-shape build declares its shapes
            "outputs": [s.to_json() for s in imported.outputs],
            "tokenizer": tokenizer,
            "verification": best.verification,
            "latency": latency,
            "timings_s": {**imported.seconds, **timings},
            "libraries": artifact.library_versions(),
        }
        artifact.write_manifest(staged, manifest)
        if options.use_cache:
            entry = artifact.cache_root() / "engines" / key
            artifact.copy_artifact(staged, entry)
            artifact.write_index(index_key, prepared.reads, key)
        artifact.publish(staged, output)
    manifest = artifact.read_manifest(output)
    return ConvertResult(output, manifest, False, time.perf_counter() - started, note, timings)


def load(path: Path | str, check: bool = True):
    """Load an engine artifact; with ``check`` its files are verified against the manifest.

    Raises:
        ArtifactError: Not an artifact, or damaged.
    """
    path = Path(path)
    manifest = artifact.validate(path) if check else artifact.read_manifest(path)
    if manifest.get("kind") == "causal-lm":
        raise ArtifactError(
            f"'{path}' is a generation engine (a causal LM with its KV cache), not a forward-pass engine.",
            "Run it with `adapter generate`, or load it with adapter.load() / adapter.llm.engine.LLMEngine.",
        )
    backend = get_backend(manifest["backend"]["name"])
    return backend.Engine.load(path)
