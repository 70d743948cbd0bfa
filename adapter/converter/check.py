"""Pre-flight: which nodes each candidate backend cannot take, before converting.

``adapter check SOURCE --target T`` imports the source as ``convert`` would (export,
canonicalize), then for every backend the target lists (or the one named) runs that
backend's own fusion passes on a copy and asks it about every node. All refusals are
listed at once, with node and ``nn.Module`` names and a suggested fix.
"""

from __future__ import annotations

__all__ = ["BackendCheck", "CheckReport", "check"]

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from adapter.backends import DEFAULT, get_backend, graph_backends
from adapter.converter.build import AUTO, auto_candidates, base_passes, refused_nodes, run_backend_passes
from adapter.converter.importer import import_source, prepare_source
from adapter.core.errors import AdapterError, UnsupportedOp
from adapter.core.specs import parse_dynamic
from adapter.passes import build_pipeline, run_pipeline
from adapter.profiles import load_profile


@dataclass
class BackendCheck:
    """One backend's answer: the nodes it refuses (empty when it runs the model)."""

    backend: str
    version: str = ""
    nodes: int = 0
    refused: list[UnsupportedOp] = field(default_factory=list)
    suggestions: dict[str, str] = field(default_factory=dict)
    """Per refused node name, what to do about it."""
    problem: str | None = None
    """Why the backend could not be asked at all (SDK missing, ...)."""

    @property
    def runs(self) -> bool:
        return self.problem is None and not self.refused

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "version": self.version,
            "runs": self.runs,
            "nodes": self.nodes,
            "problem": self.problem,
            "refused": [{**op.__dict__, "suggestion": self.suggestions.get(op.node, "")} for op in self.refused],
        }


@dataclass
class CheckReport:
    """Every candidate backend's answer for one source and target."""

    source: str
    target: str
    requested: str
    backends: list[BackendCheck]

    @property
    def ok(self) -> bool:
        """Whether the backend ``convert`` would use (any, for auto) runs the model."""
        return any(b.runs for b in self.backends)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "requested": self.requested,
            "ok": self.ok,
            "backends": [b.to_json() for b in self.backends],
        }


def _suggest(op: UnsupportedOp, runs_it: list[str], opset: int | None) -> str:
    """A fix for one refused node: another backend, a newer/older opset, or a rewrite."""
    if runs_it:
        return f"use --backend {runs_it[0]}, which runs this op" + (
            f" (also: {', '.join(runs_it[1:])})" if runs_it[1:] else ""
        )
    if " at opset " in op.reason:  # a kernel exists, for other opsets
        return f"re-export at an opset the kernels cover (the model imports opset {opset})"
    if op.domain and op.domain not in ("com.microsoft", "ai.onnx.ml"):
        if not op.module:  # an ONNX source: no module to rewrite
            return f"'{op.domain}' is a custom op no backend here implements: replace it in the ONNX graph with standard ops"
        return (
            f"'{op.domain}' is a custom op: decompose module '{op.module}' into standard torch ops, "
            "or give torch.onnx.export a custom_translation_table for it"
        )
    where = f"module '{op.module}'" if op.module else "this node"
    return f"decompose {where} into ops the backend has, or choose another target"


def check(
    source: str,
    target: str = "host",
    backend: str | None = None,
    dynamic: tuple[str, ...] = (),
    trust_source: bool = False,
    progress: Callable[[str], None] | None = None,
) -> CheckReport:
    """Ask every candidate backend about every node of ``source`` (nothing is compiled).

    Raises:
        AdapterError: The source cannot be loaded or exported, or the target is unknown.
    """
    say = progress or (lambda _m: None)
    profile = load_profile(target)
    requested = backend or getattr(profile, "default_backend", None) or DEFAULT
    names = auto_candidates(profile) if requested == AUTO else [requested]
    say("load source")
    prepared = prepare_source(source, parse_dynamic(dynamic), trust_source=trust_source)
    say("export")
    imported = import_source(prepared)
    run_pipeline(imported.model, build_pipeline(base_passes(profile)))
    results: list[BackendCheck] = []
    # The target's other backends are asked too, only to suggest one that runs a refused node.
    buildable = graph_backends()
    spare = [n for n in getattr(profile, "backends", {}) if n in buildable and n not in names]
    for name in names + spare:
        found = BackendCheck(name)
        try:
            module = get_backend(name)
        except AdapterError as exc:
            found.problem = str(exc)
            results.append(found)
            continue
        found.version = module.version()
        say(f"{name}: fusion passes and support")
        model = imported.model.clone()
        run_backend_passes(module, model)
        found.nodes = sum(1 for _ in model.graph.all_nodes())
        shapes = {name: list(value.shape) for name, value in imported.example_inputs.items()}
        try:
            found.refused = refused_nodes(module, model, profile, shapes)
        except AdapterError as exc:  # the backend's own tool rejected or crashed on the model
            found.problem = str(exc)
        results.append(found)
    opset = imported.model.opset_imports.get("", None)
    asked, results = results, results[: len(names)]
    for found in results:
        others = [r for r in asked if r is not found and r.problem is None]
        for op in found.refused:
            runs_it = [r.backend for r in others if op.node not in {o.node for o in r.refused}]
            found.suggestions[op.node] = _suggest(op, runs_it, opset)
    return CheckReport(source, profile.name, requested, results)
