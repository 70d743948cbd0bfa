"""What every fusion pass shares: stages of rewrite rules, counted per rule, then cleanup.

A fusion pass is a list of :class:`Stage` s. Each stage applies its rules one name at a
time over the whole graph (so an earlier rule has priority everywhere, and each rule's
hits are counted under its own name; the variants of one rule, such as its commuted
operand orders, share the name). A stage runs once: repeating it would also rewrite
inside the functions that ``as_function`` rules extracted the round before.

Rules that build intermediate ops in onnxscript's ``ai.onnxruntime._fusion`` domain
extract the matched nodes into a function (``as_function=True``); whatever a later stage
did not consume is inlined back at the end, so a pass never leaves an op no runtime knows.

Each rule file declares its stages once (``STAGES``, ``ORT_STAGES``, ...: which rules, in
which order) and ends, as onnxscript's ``rewriter/rules/common`` files do, with one
``rules = rule_set(<its stage families>)``: the flat :class:`RewriteRuleSet` of the same
rule objects, derived, never listed a second time.
"""

from __future__ import annotations

__all__ = [
    "FUSION_DOMAIN",
    "Stage",
    "apply_stages",
    "dims",
    "explain_misses",
    "named",
    "onnx_opset",
    "rule_name",
    "rule_set",
    "same_dim",
]

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import MatchingTracer, RewriteRule, RewriteRuleSet

FUSION_DOMAIN = "ai.onnxruntime._fusion"
"""onnxscript's domain for intermediate fused ops (SDPA, RotaryEmbedding) between stages."""


@dataclass(frozen=True)
class Stage:
    """Rules applied once over the graph, name by name; each name counts its hits."""

    rules: tuple[RewriteRule, ...]
    """The rules, tried name by name in order of first appearance."""
    shape_inference: bool = False
    """Re-run shape inference after the stage fired (later checks read the new shapes)."""


def rule_name(rule: RewriteRule) -> str:
    """The counter name of a rule (onnxscript leaves some rules unnamed)."""
    return rule.name or "unnamed_rule"


def rule_set(*families: Sequence[Stage]) -> RewriteRuleSet:
    """A rule file's ``rules``: every rule of its stage ``families``, each once, in stage order.

    The stages are the one declaration of a file's rules and of the order they apply in
    (the passes apply the stages, never this flat set); this is the onnxscript convention's
    ``rules = RewriteRuleSet([...])`` derived from them, so the two cannot disagree. A rule
    that several families share (the same object) is listed once.
    """
    seen: set[int] = set()
    rules = []
    for stages in families:
        for stage in stages:
            for rule in stage.rules:
                if id(rule) not in seen:
                    seen.add(id(rule))
                    rules.append(rule)
    return RewriteRuleSet(rules)


def named(name: str, rules: Iterable[RewriteRule]) -> tuple[RewriteRule, ...]:
    """Copies of ``rules`` counted under one name (onnxscript's variants of one fusion)."""
    renamed = []
    for rule in rules:
        rule = copy.copy(rule)
        rule.name = name
        renamed.append(rule)
    return tuple(renamed)


def dims(value: ir.Value | None) -> list | None:
    """A value's dims as a list (ints and symbols), None when its shape is unknown."""
    return None if value is None or value.shape is None else list(value.shape)


def same_dim(a, b) -> bool:
    """Dims known to be equal: equal ints, or the same named symbol."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return isinstance(a, ir.SymbolicDim) and isinstance(b, ir.SymbolicDim) and a.value is not None and a == b


def onnx_opset(model: ir.Model) -> int:
    """The model's standard-domain opset version (0 when it imports none)."""
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


def apply_stages(model: ir.Model, stages: Sequence[Stage]) -> dict[str, int]:
    """Apply ``stages`` in order to ``model`` in place; return hits per rule name.

    Afterwards, leftover intermediate ops are inlined back and the nodes, functions and
    opset imports the rewrites orphaned are removed.
    """
    counts: dict[str, int] = {}
    for stage in stages:
        fired = 0
        for name, group in _by_name(stage).items():
            hits = RewriteRuleSet(group).apply_to_model(model)
            counts[name] = counts.get(name, 0) + hits
            fired += hits
        if fired and stage.shape_inference:
            common.ShapeInferencePass(strict_mode=False)(model)
    for stage in stages:
        _forget_matches(stage.rules)
    _inline_leftovers(model)
    common.RemoveUnusedNodesPass()(model)
    common.RemoveUnusedFunctionsPass()(model)
    common.RemoveUnusedOpsetsPass()(model)
    return counts


def _forget_matches(rules: Iterable[RewriteRule]) -> None:
    """Drop what the rules' matchers hold of the last graph they matched.

    onnxscript's pattern matcher keeps the graph, the node and the bindings of its last
    match until its next one; the rules live as long as their module, so they would keep
    the last graph fused and every weight in it (TinyLlama's ONNX Runtime decoder: 2.4 GB
    of fused FP32 weights, alive after the engine was built and until the next fusion).
    Each of those is set afresh at the start of a match.
    """
    for rule in rules:
        matcher = getattr(rule, "_matcher", None)
        for attribute, value in list(getattr(matcher, "__dict__", {}).items()):
            if attribute in ("_graph", "_match", "_current_node", "_tracer") and value is not None:
                setattr(matcher, attribute, None)


def _by_name(stage: Stage) -> dict[str, list[RewriteRule]]:
    groups: dict[str, list[RewriteRule]] = {}
    for rule in stage.rules:
        groups.setdefault(rule_name(rule), []).append(rule)
    return groups


def _inline_leftovers(model: ir.Model) -> None:
    """Inline calls to intermediate fused ops that no later rule turned into a real op.

    onnx-ir's inliner inlines every model-local function; the exporter leaves none, so in
    practice these are the extracted intermediate ops only.
    """
    leftovers = [n for n in model.graph.all_nodes() if n.domain == FUSION_DOMAIN]
    if not leftovers:
        return
    missing = [n for n in leftovers if (n.domain, n.op_type, n.overload) not in model.functions]
    if missing:  # a rule without as_function=True built it; that is a bug in the rule table
        raise RuntimeError(f"intermediate op {missing[0].op_type} ({missing[0].name}) has no function to inline")
    common.InlinePass()(model)


def explain_misses(model: ir.Model, stages: Sequence[Stage], counts: dict[str, int]) -> dict[str, str]:
    """For each rule that never fired, why its best partial match failed (no rewrite).

    Uses onnxscript's matching tracer; run it on the graph *after* the pass, where the
    rules that did fire no longer interfere.
    """
    reasons: dict[str, str] = {}
    for stage in stages:
        for name, group in _by_name(stage).items():
            if counts.get(name) or name in reasons:
                continue
            tracer = MatchingTracer()
            RewriteRuleSet(group).apply_to_model(model, tracer=tracer)
            best = max(
                (m for ms in tracer.best_matches_map.values() for m in ms), key=lambda m: m.score(), default=None
            )
            if best is None:
                reasons[name] = "no node of the pattern's root op type"
            else:
                where = best.root_node.name or best.root_node.op_type
                reasons[name] = f"{best.status.name} at {where}: {best.match_result.reason or 'no reason given'}"
    return reasons
