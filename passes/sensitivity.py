"""Per-layer sensitivity and the search for a plan that holds an accuracy budget.

Sensitivity: lower one group (an ``nn.Module``'s candidate nodes) at a time and measure
the budget's score on held-out samples against the FP32 outputs. Search: lower every
group, then keep the most sensitive groups in FP32 — the smallest such set that holds
the budget, found by bisection over the sensitivity order and confirmed by measurement.

Models are ``onnx_ir`` models; :func:`ort_runner` serializes one for ONNX Runtime's session.
"""

from __future__ import annotations

__all__ = [
    "Evaluator", "choose_option", "group_count", "group_sensitivity", "local_error_sensitivity", "plan_hint",
    "search_plan",
]  # fmt: skip

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from adapter.core.budget import Budget, output_metrics
from adapter.passes.precision import PrecisionPlan, apply_plan
from adapter.passes.saturation import matmul_errors

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
HINTS = {"bf16": "bf16", "fp16": "fp16"}
"""Modes realised by a backend's precision hint rather than in the graph."""


def plan_hint(plan: PrecisionPlan) -> str:
    """The backend precision hint a plan's engine is compiled with: its own ``hint`` option
    (an INT8 plan whose kept layers run BF16), else its mode's, else FP32."""
    return plan.options.get("hint") or HINTS.get(plan.mode, "fp32")
FITTED_MODES = {"int8", "fp8"}
"""Modes whose result depends on the calibration samples (so those cannot judge them)."""


def ort_runner(model: ir.Model, threads: int) -> Runner:
    """An ONNX Runtime CPU session over an in-memory model (full graph optimisation),
    serialized for the session."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda feed: dict(zip(names, session.run(names, feed)))


@dataclass
class Evaluator:
    """Measures a candidate model against the FP32 model on held-out samples."""

    fp32: ir.Model
    calibration: list[dict[str, np.ndarray]]
    held_out: list[dict[str, np.ndarray]]
    budget: Budget
    make_runner: Callable[[ir.Model, str], Runner]
    """Builds a runner for a model and a backend precision hint (fp32, bf16, fp16)."""
    cache_dir: Path | None = None
    """Where static quantization's calibration ranges are cached."""
    probe_samples: int = 64
    """Held-out samples used per sensitivity probe (the plan itself is judged on all)."""
    runs: int = 0
    seconds: float = 0.0
    _reference: list[dict[str, np.ndarray]] = field(default_factory=list)

    def samples(self, plan: PrecisionPlan) -> list[dict[str, np.ndarray]]:
        """Samples a mode is judged on: held-out only when the mode fits to calibration
        data (static INT8 / FP8 ranges); every sample otherwise (more data, a truer minimum)."""
        # smoothing strengths and weight widths are fitted to calibration samples too
        fitted = plan.mode in FITTED_MODES or any(plan.options.get(k) for k in ("smooth_alpha", "narrow_weights"))
        return self.held_out if fitted else self.held_out + self.calibration

    def reference(self, count: int) -> list[dict[str, np.ndarray]]:
        everything = self.held_out + self.calibration
        if len(self._reference) < count:
            run = self.make_runner(self.fp32, "fp32")
            self._reference += [run(feed) for feed in everything[len(self._reference) : count]]
        return self._reference[:count]

    def measure(self, plan: PrecisionPlan, probe: bool = False) -> dict[str, dict[str, Any]]:
        """Apply ``plan``, run its evaluation samples (a subset for a probe), return metrics."""
        start = time.perf_counter()
        model = apply_plan(self.fp32, plan, self.calibration, self.cache_dir)
        run = self.make_runner(model, plan_hint(plan))
        samples = self.samples(plan)
        count = min(self.probe_samples, len(samples)) if probe else len(samples)
        figures = output_metrics(self.reference(count), [run(feed) for feed in samples[:count]])
        self.runs += 1
        self.seconds += time.perf_counter() - start
        return figures


def choose_option(
    plan: PrecisionPlan,
    evaluator: Evaluator,
    key: str,
    values: tuple[Any, ...],
    progress: Callable[[str], None] | None = None,
    refine: Callable[[PrecisionPlan], PrecisionPlan] | None = None,
) -> tuple[PrecisionPlan, dict[str, float]]:
    """The plan with the value of option ``key`` under which the fully lowered plan scores
    best against the budget (first value on ties), and every value's score.

    ``refine`` completes each trial plan before it is measured (options that depend on
    the value, such as the weight widths fitted to the smoothed weights).

    For options that change how every lowered node is quantized (SmoothQuant's migration
    strength): the best of them leaves the fewest groups for :func:`search_plan` to keep.
    """
    say = progress or (lambda _msg: None)
    scores: dict[str, float] = {}
    best, best_score = plan, float("-inf")
    for value in values:
        say(f"{key} = {value}: measuring the fully lowered plan")
        trial = PrecisionPlan(**{**plan.__dict__, "options": {**plan.options, key: value}})
        trial = refine(trial) if refine else trial
        score = evaluator.budget.score(evaluator.measure(trial))
        scores[str(value)] = round(score, 6)
        if score > best_score:
            best, best_score = trial, score
    return best, scores


def group_count(plan: PrecisionPlan) -> int:
    """How many groups (modules) the search may keep out of ``plan``."""
    return len(_groups(plan))


def _groups(plan: PrecisionPlan) -> list[str]:
    seen: dict[str, None] = {}
    for node in plan.nodes:
        if node not in plan.overrides:
            seen.setdefault(plan.modules.get(node) or node, None)
    return list(seen)


def group_sensitivity(plan: PrecisionPlan, evaluator: Evaluator) -> dict[str, float]:
    """Budget score with only one group lowered (lower score = more sensitive)."""
    groups = _groups(plan)
    scores = {}
    for group in groups:
        only = plan.with_kept([g for g in groups if g != group], "sensitivity probe")
        scores[group] = evaluator.budget.score(evaluator.measure(only, probe=True))
    return scores


LOCAL_ERROR_SAMPLES = 16
"""Calibration samples the one-run ranking reads."""


def local_error_sensitivity(plan: PrecisionPlan, evaluator: Evaluator) -> dict[str, float]:
    """A ranking in one run instead of one probe per group: every candidate lowered, each
    MatMul's own error (its lowered output against its input times the FP32 weight,
    ``adapter.passes.saturation.matmul_errors``), and a group scored ``1 - its worst
    MatMul's error`` (lower = more sensitive, as :func:`group_sensitivity`'s scores). When
    some group has no MatMul/Gemm measured (a Conv), every group is probed instead."""
    lowered = apply_plan(evaluator.fp32, plan, evaluator.calibration, evaluator.cache_dir)
    nodes = [n for n in plan.nodes if n not in plan.overrides]
    errors = matmul_errors(evaluator.fp32, lowered, nodes, evaluator.calibration[:LOCAL_ERROR_SAMPLES])
    evaluator.runs += 1
    groups = _groups(plan)
    measured = {plan.modules.get(n) or n for n in errors}
    if not set(groups) <= measured:  # a group with no MatMul/Gemm measured (a Conv): probe every group
        return group_sensitivity(plan, evaluator)
    scores = {group: 1.0 for group in groups}
    for node, error in errors.items():
        group = plan.modules.get(node) or node
        if group in scores:
            scores[group] = min(scores[group], 1.0 - error)
    return scores


Ranker = Callable[[PrecisionPlan, Evaluator], dict[str, float]]


def search_plan(
    plan: PrecisionPlan,
    evaluator: Evaluator,
    progress: Callable[[str], None] | None = None,
    limit: int | None = None,
    ranker: Ranker | None = None,
) -> tuple[PrecisionPlan, bool]:
    """Keep the fewest most-sensitive groups in FP32 such that the budget holds.

    ``limit``: keep at most this many (more would not pay: see ``lower_precision``); when
    the budget needs more, the search ends without a plan, before the sensitivity probes
    if the limit is 0. ``ranker`` orders the groups (default :func:`group_sensitivity`:
    one probe per group; :func:`local_error_sensitivity` ranks them in one run).

    Returns:
        The plan (with sensitivity, budget and measured figures filled in) and whether
        it holds the budget; when none does, the tried plan that came closest.
    """
    say = progress or (lambda _msg: None)
    say("measuring the plan with every group lowered")
    figures = evaluator.measure(plan)
    holds, _ = evaluator.budget.judge(figures)
    result = PrecisionPlan(**{**plan.__dict__, "budget": str(evaluator.budget)})
    if holds:
        result.measured = {"accuracy": figures, "budget_holds": True}
        return result, True
    if limit is not None and limit < 1:
        result.measured = {"accuracy": figures, "budget_holds": False}
        return result, False
    say(f"sensitivity of {len(_groups(plan))} groups")
    scores = (ranker or group_sensitivity)(plan, evaluator)
    order = sorted(scores, key=lambda g: scores[g])  # most sensitive first
    reason = f"sensitivity: kept {plan_hint(plan).upper()} to hold {evaluator.budget}"
    # Bisection over how many of the most sensitive groups stay FP32; keeping all of them
    # is no plan at all (it is the FP32 model), so at most len(order) - 1 are kept.
    lo, hi = 1, len(order) - 1 if limit is None else min(len(order) - 1, limit)
    best: tuple[int, dict] | None = None
    closest: tuple[float, int, dict] = (evaluator.budget.score(figures), 0, figures)
    while lo <= hi:
        mid = (lo + hi) // 2
        say(f"trying {mid} of {len(order)} groups kept in FP32")
        trial = evaluator.measure(plan.with_kept(order[:mid], reason))
        if evaluator.budget.judge(trial)[0]:
            best = (mid, trial)
            hi = mid - 1
        else:
            closest = max(closest, (evaluator.budget.score(trial), mid, trial), key=lambda c: c[0])
            lo = mid + 1
    if best is None:
        _, kept, figures = closest
        holds = False
    else:
        (kept, figures), holds = best, True
    final = plan.with_kept(order[:kept], reason)
    for node, info in final.overrides.items():
        group = final.modules.get(node) or node
        if group in scores:
            info["sensitivity"] = round(scores[group], 6)
    final.sensitivity = {g: round(s, 6) for g, s in scores.items()}
    final.budget = str(evaluator.budget)
    final.measured = {"accuracy": figures, "budget_holds": holds}
    return final, holds
