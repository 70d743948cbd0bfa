"""Build one backend's engine from the canonical graph, and ``--backend auto``'s choice.

A candidate is one backend: its own fusion passes (the backend's ``PASSES``),
support check, precision lowering, compile, verification against eager PyTorch and a
latency measurement on the example inputs. ``--backend auto`` builds every candidate the
target profile lists, keeps the fastest that verifies, and records all of them.
"""

from __future__ import annotations

__all__ = [
    "AUTO",
    "Candidate",
    "auto_candidates",
    "base_passes",
    "build_candidate",
    "choose",
    "refused_nodes",
    "run_backend_passes",
]

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from adapter.backends import BACKENDS, auto_backends, get_backend
from adapter.backends.base import EngineBase, fix_shapes, unsupported_nodes
from adapter.converter.precision import PrecisionResult, lower_precision
from adapter.core.errors import AdapterError, SourceError, UnsupportedOpsError
from adapter.core.specs import example_sizes
from adapter.core.timing import block_samples, median_ms, time_cases
from adapter.core.verify import verify, verify_budget
from adapter.passes import build_pipeline, run_pipeline
from adapter.passes.base import PassRecord
from adapter.passes.precision import PrecisionPlan

AUTO = "auto"


@dataclass
class Candidate:
    """One backend's engine (or why it could not be built)."""

    name: str
    version: str = ""
    records: list[PassRecord] = field(default_factory=list)
    model: ir.Model | None = None
    lowered: PrecisionResult | None = None
    engine: EngineBase | None = None
    verification: dict[str, Any] | None = None
    latency_ms: float | None = None
    error: AdapterError | None = None
    """Why the backend could not build a verified engine (None when it did)."""

    @property
    def problem(self) -> str | None:
        return None if self.error is None else str(self.error)

    @property
    def ok(self) -> bool:
        return self.error is None

    def summary(self, chosen: bool) -> dict[str, Any]:
        """JSON-ready figures for the manifest's candidate table."""
        worst = (self.verification or {}).get("worst", {})
        fused = {k: v for r in self.records for k, v in r.counters.items() if isinstance(v, int) and v}
        created: dict[str, int] = {}  # net new ops from the fusion passes, e.g. com.microsoft::Attention 6
        for record in self.records:
            for op, delta in record.op_delta.items():
                created[op] = created.get(op, 0) + delta
        return {
            "backend": self.name,
            "version": self.version,
            "chosen": chosen,
            "latency_ms": self.latency_ms,
            "precision": self.lowered.report["mode"] if self.lowered else "fp32",
            "verified": bool(self.verification and self.verification.get("passed")),
            "max_abs": max((w["max_abs"] for w in worst.values()), default=None),
            "cosine": min((w["cosine"] for w in worst.values()), default=None),
            "fusions": fused,
            "fused_ops": {op: n for op, n in sorted(created.items()) if n > 0},
            "problem": self.problem,
        }


QUANTIZE_BEFORE_FUSION = frozenset({"int8", "int8-dynamic", "int4-weight", "fp8", "auto"})
"""Precision modes lowered before the backend's fusion passes (see build_candidate)."""


def _requested_mode(precision: Any) -> str:
    """The mode asked for: the plan file's when one is given."""
    if precision.plan:
        try:
            return PrecisionPlan.load(Path(precision.plan)).mode
        except SourceError:
            return precision.mode  # lower_precision reports the bad file
    return precision.mode


def base_passes(profile: Any, requested: tuple[str, ...] | None = None) -> list[str]:
    """The passes every backend's copy starts from: ``--passes``, else the profile's, else canonicalize."""
    if requested is not None:
        return list(requested)
    return list(getattr(profile, "passes", None) or ["canonicalize"])


def run_backend_passes(backend: Any, model: ir.Model) -> list[PassRecord]:
    """Run a backend's own fusion pipeline (its ``PASSES``) on ``model``."""
    names = list(backend.PASSES)
    return run_pipeline(model, build_pipeline(names)) if names else []


def auto_candidates(profile: Any) -> list[str]:
    """The backends ``auto`` tries for a profile (``adapter.backends.auto_backends``)."""
    names = auto_backends(profile)
    if not names:
        raise AdapterError(
            f"Target '{profile.name}' lists no backend adapter can build here (it lists {', '.join(profile.backends) or 'none'}).",
            f"Choose one with --backend ({', '.join(sorted(BACKENDS))}).",
        )
    return names


def build_candidate(
    name: str,
    canonical: ir.Model,
    imported: Any,
    profile: Any,
    options: Any,
    workdir: Path,
    calibration_cache: Path,
    say: Callable[[str], None],
    measure: bool = True,
    beat_ms: float | None = None,
) -> Candidate:
    """Build, verify and time one backend's engine in ``workdir``.

    Raises:
        AdapterError: The backend is missing, refuses nodes, no plan holds the budget, or
            the engine fails verification.
    """
    backend = get_backend(name)
    found = Candidate(name, backend.version())
    model = canonical.clone()  # each backend fuses and lowers its own copy
    fuse = options.passes is None and bool(backend.PASSES)
    # Weight quantization goes first: fused ops (Attention packs the Q/K/V projections)
    # would hide MatMuls from the quantizer. FP16/BF16 lower the fused graph.
    quantize_first = _requested_mode(options.precision) in QUANTIZE_BEFORE_FUSION
    overrides = _shape_overrides(backend, imported, dict(options.backend_options))
    if fuse and not quantize_first:
        say(f"{name}: fusion passes")
        found.records = run_backend_passes(backend, model)
    _check_support(name, backend, model, profile, overrides)
    say(f"{name}: precision")
    found.lowered = lower_precision(
        imported, model, profile, backend, name, options.precision, calibration_cache, say, beat_ms
    )
    found.model = found.lowered.model if found.lowered else model
    if fuse and quantize_first:
        say(f"{name}: fusion passes")
        found.records = run_backend_passes(backend, found.model)
        _check_support(name, backend, found.model, profile, overrides)
    if found.lowered and "precision" in backend.BUILD_OPTIONS:
        overrides.setdefault("precision", found.lowered.backend_precision)
    say(f"{name}: compile")
    backend_options = backend.Options.from_profile(profile, overrides)
    found.engine = backend.compile(found.model, profile, backend_options, (imported.inputs, imported.outputs), workdir)
    ran = found.engine.config.get("layer_precisions")
    if found.lowered and ran and found.lowered.plan.mode in LOW_KERNELS:
        found.lowered.report["kernels"] = _kernels_ran(found.lowered.plan, ran)
    runner = found.engine
    if not found.engine.runs_here:  # built for another machine: verify what runs the same graph here
        stand_in = found.engine.stand_in()
        if stand_in is None:
            raise AdapterError(f"The {name} engine cannot run here and has no stand-in to verify it with.")
        runner, described = stand_in
        say(f"{name}: verify through the stand-in ({described})")
    else:
        say(f"{name}: verify")
    tolerance = found.lowered.tolerance if found.lowered and found.lowered.tolerance else options.tolerance
    found.verification = verify(
        runner.run,
        imported.reference,
        found.engine.inputs,  # the engine's own specs: a fixed-shape build is verified at its shapes
        imported.example_inputs,
        tolerance,
        options.verify_samples,
    )
    if runner is not found.engine:
        found.verification["verified_with"] = described
        found.verification["engine_ran"] = False
    if found.lowered and found.lowered.budget is not None:
        found.verification["budget"] = verify_budget(
            runner.run, imported.reference, found.lowered.held_out, found.lowered.budget
        )
    if measure and found.engine.runs_here:
        say(f"{name}: measure")
        found.latency_ms = median_ms(lambda: found.engine.run(imported.example_inputs))
    return found


LOW_KERNELS = {"int8": "i8", "int8-dynamic": "i8", "fp8": "f8", "int4-weight": "i4"}
"""The kernel precision (the backend's runtime graph) a plan's lowered matrix products should run at."""


def _kernels_ran(plan: PrecisionPlan, ran: dict[str, str]) -> dict[str, Any]:
    """Whether the plan's lowered matrix products run low-precision kernels in the engine
    (``ran``: node to the precision of the kernel it became), and which do not."""
    want = LOW_KERNELS[plan.mode]
    lowered = [n for n in plan.nodes if n not in plan.overrides and n in ran]
    same = (want, "u8") if want == "i8" else (want,)  # unsigned activations are INT8 kernels too (u8 x s8)
    off = {n: ran[n] for n in lowered if not ran[n].startswith(same)}
    return {"expected": want, "lowered": len(lowered), "ran_low": len(lowered) - len(off), "not_low": off}


def refused_nodes(backend: Any, model: ir.Model, profile: Any, shapes: dict[str, list[int]]) -> list[Any]:
    """Every node the backend refuses; fixed-shape backends are asked about the graph they build."""
    if backend.FIXED_SHAPES:
        model = fix_shapes(model, shapes)
    return unsupported_nodes(model, lambda n, m: backend.supports(n, m, profile))


def _check_support(name: str, backend: Any, model: ir.Model, profile: Any, overrides: dict[str, Any]) -> None:
    missing = refused_nodes(backend, model, profile, overrides.get("shapes") or {})
    if missing:
        raise UnsupportedOpsError(name, missing)


def _shape_overrides(backend: Any, imported: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """Shape options a backend takes from the example inputs unless the user gave them.

    ``shapes`` (fixed-shape builds such as TVM's): each input's example shape. ``opt_dims``
    (TensorRT's optimisation profiles): each dynamic dim's size in the examples.
    """
    takes = backend.BUILD_OPTIONS
    examples = imported.example_inputs
    if "shapes" in takes:
        overrides.setdefault("shapes", {name: list(value.shape) for name, value in examples.items()})
    if "opt_dims" in takes:
        overrides.setdefault("opt_dims", example_sizes(imported.inputs, examples))
    return overrides


def choose(candidates: list[Candidate], staged: Path, feed: dict[str, Any] | None = None) -> Candidate:
    """Keep the fastest candidate that verified; move its files into ``staged``.

    With several candidates and a ``feed``, they are timed again in rotating blocks (every
    engine sees the same background load, slow windows re-timed; see ``_race``), and
    those figures decide.

    Raises:
        AdapterError: No candidate could be built (the first one's error, with the
            others' problems appended).
    """
    good = [c for c in candidates if c.ok and c.engine is not None]
    if not good:
        first = next(c.error for c in candidates if c.error is not None)
        if len(candidates) > 1:  # keep the first error's type (exit code); name every backend's problem
            others = "; ".join(f"{c.name}: {c.problem}" for c in candidates[1:])
            first.message = f"No backend could build this model. {candidates[0].name}: {first.message} Also {others}"
        raise first
    runnable = [c for c in good if c.engine.runs_here]
    if len(runnable) > 1 and feed is not None:
        for c, latency in zip(runnable, _race(runnable, feed)):
            c.latency_ms = latency
    best = min(good, key=lambda c: c.latency_ms if c.latency_ms is not None else float("inf"))
    engine = best.engine
    if engine.folder.resolve() != staged.resolve():  # auto: built in its own folder; reopen from the artifact's
        engine.save(staged)
        best.engine = type(engine)(staged, engine.inputs, engine.outputs, engine.config)
    for c in candidates:
        if c.engine is not None and c is not best:
            c.engine = None  # release sessions before their folders go
    return best


RACE_BLOCKS = 7
"""Timed blocks per candidate when ``choose`` times them again."""
RACE_BLOCK_S = 0.3
"""About this much engine time per block (at least 1, at most 10 calls)."""
RACE_GUARD_S = 10.0
"""At most this long re-timing blocks the machine probe saw a slow window around."""


def _race(runnable: list[Candidate], feed: dict[str, Any]) -> list[float]:
    """Each candidate's latency (ms): the median over blocks of the block's fastest call.

    Blocks rotate between the candidates, and the machine guard of ``adapter bench``
    re-times a block run in one of the VM's slow windows (up to 1.47x for ~15 s on the
    2-core host): with candidates a few percent apart, the median of all calls in a
    20 s window picked either one.
    """
    slowest = max((c.latency_ms or 0.0) for c in runnable) / 1e3
    iterations = max(1, min(10, int(RACE_BLOCK_S / slowest))) if slowest > 0 else 5
    calls = time_cases(
        {c.name: (lambda e=c.engine: e.run(feed)) for c in runnable},
        repeats=RACE_BLOCKS, iterations=iterations, warmup=2, guard_s=RACE_GUARD_S, guarded={},
    )  # fmt: skip
    return [float(np.median(block_samples(calls[c.name]))) for c in runnable]


def drop_workdirs(root: Path) -> None:
    """Remove the candidates' build folders."""
    shutil.rmtree(root, ignore_errors=True)
