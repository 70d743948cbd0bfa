"""The convert step that lowers precision: calibration, plan, budget search, auto choice."""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from adapter.backends import BACKENDS
from adapter.converter.roofline import overhead_bound, peak_key, roofline
from adapter.core.budget import Budget, output_metrics, parse_budget
from adapter.core.errors import AdapterError, SourceError
from adapter.core.timing import median_ms, paired_median_ms
from adapter.core.verify import Tolerance
from adapter.passes.base import PassRecord
from adapter.passes.calibration import collect_ranges, load_calibration, synthetic_calibration
from adapter.passes.precision import (
    MODES,
    ApplyPrecisionPlan,
    PrecisionPlan,
    apply_plan,
    default_plan,
    fit_weight_widths,
    fp16_overflow_overrides,
    model_size,
    uses_nncf,
)
from adapter.passes.sensitivity import (
    HINTS,
    Evaluator,
    choose_option,
    group_count,
    local_error_sensitivity,
    ort_runner,
    plan_hint,
    search_plan,
)
from adapter.profiles.schema import HOST

__all__ = ["CHOICES", "NEAR_LOSSLESS", "reached_ms", "runs_natively", "PrecisionOptions", "PrecisionResult", "PrecisionBudgetError", "lower_precision"]

AUTO_ORDER = ("bf16", "fp16", "int8", "int8-dynamic", "fp8", "int4-weight")
"""The modes ``auto`` tries, in this order: the ones that need no search first, so the best
latency so far is low early and the others' fully lowered ceilings are judged against it."""
MIXED_MODES = frozenset({"int8", "int8-dynamic", "fp8"})
"""Modes whose layers kept out of the plan run BF16 (the backend's hint) instead of FP32
where the backend and target compute BF16 natively: one engine, INT8 and BF16."""
PRUNE = 0.85
"""A mode is searched only when fully lowered it runs in under this fraction of the best
latency so far (FP32's, a mode's that held, or another backend's engine's): a plan that
holds a budget keeps some layers wider, so it lands between the two. The search then keeps
at most as many groups as the latency the gap allows (assuming each kept group costs an
equal share of the difference between fully lowered and fully kept)."""
CHOICES = ("default", *MODES)
"""``--precision`` values: ``default`` is the near-lossless choice below, the others modes."""
NEAR_LOSSLESS = "cos>=0.9999,max_rel<=0.02"
"""The default's budget, judged per output against the FP32 engine: a mean row cosine of
0.9999 (its 95% lower bound; the lowest row at least 0.9996) and no element further off
than 2% of the output's largest magnitude. MiniLM in BF16 on the project's sentences:
cos 0.99998 (min 0.99996), max_rel 0.0025 (token_embeddings) and 0.0051 (sentence_embedding)."""
NEAR_LOSSLESS_MODE = "bf16"
"""What the default tries: BF16 needs no calibration, and where the CPU computes it natively
(AVX512_BF16, AMX) it runs 2-7x the FP32 rate."""
NEAR_LOSSLESS_GAIN = 0.95
"""BF16 is kept only when it runs in at most this fraction of FP32's time."""
SENTENCES = Path(__file__).resolve().parents[1] / "data" / "sentences.txt"
"""The project's English sentences: what the default judges a text model on."""
DEFAULT_AUTO_BUDGET = "cos>=0.999"
SMOOTH_ALPHA = 0.5
"""Migration strength of activation smoothing before INT8 dynamic (SmoothQuant's default),
used as is without a budget."""
SMOOTH_ALPHAS = (0.5, 0.65, 0.8)
"""Strengths tried under a budget; the one whose fully lowered plan scores best is kept.
MiniLM, every Linear in INT8 dynamic, held-out sentences: per-token cosine mean / min
0.9858 / 0.957 at 0.5, 0.9941 / 0.983 at 0.65, 0.9948 / 0.981 at 0.8 (0.9905 / 0.964
unsmoothed); with the weight widths fitted (7-bit where the kernel saturates) 0.9864 /
0.949, 0.9954 / 0.981 and 0.9964 / 0.986 -- the best strength depends on the model (and
on the judging samples: 0.65 wins on MiniLM's, where 0.8's minimum falls to 0.979), so
it is measured."""
_MIN_COSINE = {"fp16": 0.999, "bf16": 0.999}
"""Cosine a mode must keep without a budget (others: 0.99 on held-out, 0.9 on random inputs)."""


class PrecisionBudgetError(AdapterError):
    """No precision plan holds the accuracy budget."""

    exit_code = 11


@dataclass(frozen=True)
class PrecisionOptions:
    """How to choose precisions (all part of the cache key)."""

    mode: str = "default"
    """default (BF16 where it is near-lossless and faster, else FP32), fp32 (exact), fp16,
    bf16, fp8, int8, int8-dynamic, int4-weight or auto."""
    budget: str | None = None
    """Accuracy budget, e.g. cos>=0.999 (auto defaults to cos>=0.999)."""
    calib: str | None = None
    """An .npz file or a folder of them, one feed each."""
    calib_text: str | None = None
    """A text file, one calibration sample per line, tokenized with the model's tokenizer."""
    plan: str | None = None
    """A precision plan JSON to apply as is."""
    calibrate_method: str = "minmax"
    """INT8 static calibration: minmax, entropy or percentile."""
    max_samples: int = 256
    """At most this many calibration samples are used."""

    def files_digest(self) -> str:
        """Hash of the calibration data and plan files' contents (for the cache key)."""
        digest = hashlib.sha256()
        for name in (self.calib, self.calib_text, self.plan):
            if not name:
                continue
            path = Path(name)
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for file in files:
                digest.update(file.name.encode())
                digest.update(file.read_bytes() if file.is_file() else b"missing")
        return digest.hexdigest()


@dataclass
class PrecisionResult:
    """The lowered model and what the report and the backend need to know."""

    model: ir.Model
    plan: PrecisionPlan
    report: dict[str, Any]
    backend_precision: str = "fp32"
    tolerance: Tolerance | None = None
    warnings: list[str] = field(default_factory=list)
    budget: Budget | None = None
    held_out: list[dict[str, np.ndarray]] = field(default_factory=list)
    record: PassRecord | None = None
    """What :class:`ApplyPrecisionPlan` did to the chosen model (None when it stays FP32)."""


def _allowed(mode: str, profile: Any, backend) -> str | None:
    """Why ``mode`` cannot be used with this target and backend (None when it can); the
    target's reason first where both hold (on an AVX2-only CPU no backend would run BF16)."""
    native = {"int8-dynamic": "int8", "int4-weight": "fp32"}.get(mode, mode)
    target = None
    if native not in getattr(profile, "precisions", ()):
        target = f"target '{profile.name}' lists no {native} support (it has {', '.join(profile.precisions)})"
    if mode not in backend.PRECISIONS:
        runs = sorted(name for name, other in BACKENDS.items() if mode in other.PRECISIONS)
        why = f"backend '{backend.NAME}' does not run {mode} engines here (backends that do: {', '.join(runs) or 'none'})"
        return f"{target}; and {why}" if target else why
    return target


def _skipped(mode: str, why: str, kept: int = 0, accuracy: dict | None = None) -> dict[str, Any]:
    """The trial record of a mode ``auto`` did not build or search further, and why."""
    return {"mode": mode, "holds": False, "kept_fp32": kept, "latency_ms": None, "accuracy": accuracy, "skipped": why}


def _has_peak(mode: str, profile: Any) -> bool:
    """Whether the profile has the figure ``mode``'s roofline estimate needs (a mode whose
    peak is not measured is tried, not estimated at FP32's rate)."""
    return peak_key(mode, profile) != "fp32" or mode in ("fp32", "int4-weight")


def runs_natively(mode: str, profile: Any, backend) -> bool:
    """Whether ``backend`` builds ``mode`` engines that the target computes natively."""
    return _allowed(mode, profile, backend) is None


def reached_ms(result: PrecisionResult | None) -> float | None:
    """The latency a lowered engine was measured at (its plan's, else its FP32 engine's)."""
    figures = (result.report.get("latency_ms") or {}) if result else {}
    return figures.get("plan") or figures.get("fp32")


def _calibration(options: PrecisionOptions, imported, warnings: list[str]):
    if options.calib:
        return load_calibration(Path(options.calib), imported.inputs, limit=options.max_samples)
    if options.calib_text:
        return load_calibration(
            Path(options.calib_text), imported.inputs, tokenizer=imported.tokenizer, limit=options.max_samples
        )
    warnings.append(
        "No calibration data given (--calib / --calib-text): synthetic inputs used, so accuracy figures are only indicative."
    )
    return synthetic_calibration(imported.inputs, imported.example_inputs)


def _mode_plan(
    mode: str, fp32: ir.Model, calibration, options: PrecisionOptions, cache_dir: Path
) -> PrecisionPlan:
    extra = {"calibrate_method": options.calibrate_method} if mode == "int8" else {}
    if mode == "int8-dynamic":
        extra["smooth_alpha"] = SMOOTH_ALPHA
    plan = default_plan(fp32, mode, extra)
    if mode == "fp16":
        ranges = collect_ranges(fp32, calibration.samples, cache_dir)
        plan.overrides.update(fp16_overflow_overrides(fp32, ranges))
    return plan


class _Backend:
    """Compiles candidate models with the chosen backend; runs and times them."""

    def __init__(self, backend, backend_name: str, profile: Any, specs) -> None:
        self.backend, self.name, self.profile, self.specs = backend, backend_name, profile, specs
        self._dirs: list[tempfile.TemporaryDirectory] = []
        self.stand_in_note = ""
        """Set when the engines are built for another machine: what accuracy and speed were measured on."""

    def engine(self, model: ir.Model, hint: str):
        folder = tempfile.TemporaryDirectory(prefix="adapter-candidate-")
        self._dirs.append(folder)
        takes_hint = "precision" in self.backend.BUILD_OPTIONS
        opts = self.backend.Options.from_profile(self.profile, {"precision": hint} if takes_hint else {})
        # a clone: backends may change the model they compile (their own passes)
        engine = self.backend.compile(model.clone(), self.profile, opts, self.specs, Path(folder.name))
        if not engine.runs_here:  # built for another machine: measure what runs the same graph here
            stand_in = engine.stand_in()
            if stand_in is None:
                raise AdapterError(f"The {self.name} engine cannot run here and has no stand-in to measure.")
            engine, self.stand_in_note = stand_in
        return engine

    def runner(self, model: ir.Model, hint: str):
        if self.name == "onnxruntime":
            return ort_runner(model, self.profile.threads)
        return self.engine(model, hint).run

    def against(self, model: ir.Model, hint: str, reference, feed) -> tuple[float, float]:
        """(model's ms, reference engine's ms), timed in rotating blocks on ``feed``."""
        engine = self.engine(model, hint)
        times = paired_median_ms(
            {"model": lambda: engine.run(feed), "reference": lambda: reference.run(feed)}, repeats=20
        )
        return times["model"], times["reference"]

    def close(self) -> None:
        for folder in self._dirs:
            folder.cleanup()
        self._dirs.clear()


def _nncf_quantizes(mode: str, backend_name: str, options: PrecisionOptions, loaded, fp32: ir.Model) -> bool:
    """Whether a new INT8 static plan goes through NNCF: on OpenVINO, for a graph with
    attention, with the default calibration method (NNCF has no entropy/percentile choice;
    those keep ONNX Runtime's tool). A plan file says its quantizer itself."""
    return (mode == "int8" and backend_name == "openvino" and loaded is None
            and options.calibrate_method == "minmax" and uses_nncf(fp32))  # fmt: skip


def _fits_widths(plan: PrecisionPlan, loaded: PrecisionPlan | None, runner: _Backend) -> bool:
    """Whether the INT8 dynamic weight widths are measured for this plan: not for a plan
    file (it says them), and only when the engine runs on this machine (the kernel whose
    saturation is measured is this machine's)."""
    return plan.mode == "int8-dynamic" and loaded is None and not runner.stand_in_note


def _width_fitter(fp32: ir.Model, samples, record: dict, say: Callable[[str], None]):
    """A ``refine`` for :func:`choose_option`: fits ``narrow_weights`` to a trial plan
    (its smoothing changes the weights) and records the measured errors per strength."""

    def refine(plan: PrecisionPlan) -> PrecisionPlan:
        say("measuring 8-bit against 7-bit weights per MatMul on this CPU's kernels")
        fit = fit_weight_widths(fp32, plan, samples)
        record[plan.options.get("smooth_alpha")] = fit
        return PrecisionPlan(**{**plan.__dict__, "options": {**plan.options, "narrow_weights": fit["narrow"]}})

    return refine


def _narrow(plan: PrecisionPlan) -> list[dict[str, Any]]:
    """The MatMuls given 7-bit weights, with their measured errors when fitted here."""
    errors = plan.measured.get("weight_widths", {})
    return [
        {"node": n, "module": plan.modules.get(n, ""), "int8": None, "int7": None, **errors.get(n, {})}
        for n in plan.options.get("narrow_weights", ())
        if n not in plan.overrides
    ]


def _summarise(plan: PrecisionPlan) -> tuple[dict[str, str], list[dict[str, Any]]]:
    modules: dict[str, str] = {}
    wider = "bf16" if plan.options.get("hint") == "bf16" else "fp32"  # what the kept layers run in
    for node in plan.nodes:
        group = plan.modules.get(node) or node
        precision = wider if node in plan.overrides else plan.mode
        modules[group] = precision if modules.get(group, precision) == precision else "mixed"
    kept = [{"node": n, "precision": wider, **info} for n, info in plan.overrides.items()]
    return modules, kept


def _judging_samples(imported) -> tuple[list[dict[str, np.ndarray]], str]:
    """What the default judges BF16 on: the project's sentences for a model with a
    tokenizer, else random feeds drawn like the examples."""
    if getattr(imported, "tokenizer", None) is not None and SENTENCES.is_file():
        with contextlib.suppress(AdapterError):  # a tokenizer that does not fit the inputs
            found = load_calibration(SENTENCES, imported.inputs, tokenizer=imported.tokenizer, limit=32)
            return found.samples, "the project's sentences (adapter/data/sentences.txt)"
    return synthetic_calibration(imported.inputs, imported.example_inputs).samples, "random inputs like the examples"


def _exact(model: ir.Model, report: dict[str, Any]) -> PrecisionResult:
    """The default's answer when FP32 stays: the graph as is, verified as FP32 (no budget)."""
    return PrecisionResult(model, PrecisionPlan(mode="fp32"), {**report, "mode": "fp32"}, "fp32", None, [], None)


def _near_lossless(imported, fp32: ir.Model, profile: Any, backend, backend_name: str, say) -> PrecisionResult:
    """``--precision default``: BF16 when the backend and target compute it natively, it
    holds :data:`NEAR_LOSSLESS` against the FP32 engine and it is faster; FP32 otherwise.
    The report says which, why, and how to get exact FP32."""
    budget = parse_budget(NEAR_LOSSLESS)
    mode = NEAR_LOSSLESS_MODE
    base = {"requested": "default", "budget": str(budget), "exact": "--precision fp32"}
    why = _allowed(mode, profile, backend)
    if why:
        return _exact(fp32, {**base, "reason": f"{why}, so FP32"})
    if getattr(profile, "kind", "cpu") != "cpu":  # a GPU engine: only a CPU stand-in runs here
        return _exact(fp32, {**base, "reason": f"a {profile.kind} engine's {mode} cannot be measured on this "
                             f"machine, so FP32; --precision {mode} asks for it"})  # fmt: skip
    say(f"{backend_name}: default precision, {mode} against {budget}")
    samples, source = _judging_samples(imported)
    runner = _Backend(backend, backend_name, profile, (imported.inputs, imported.outputs))
    try:
        exact = runner.engine(fp32, "fp32")
        on_host = getattr(profile, "name", HOST) == HOST and not runner.stand_in_note  # peak and timing of one machine
        bound = overhead_bound(fp32, imported.inputs, imported.example_inputs, exact.run, profile) if on_host else None
        if bound:
            return _exact(fp32, {**base, "reason": f"{bound}: per-op overhead sets its time and {mode} does not shorten it, so FP32"})
        reduced = runner.engine(fp32, HINTS[mode])
        if runner.stand_in_note:  # neither speed nor BF16's numerics can be measured on a stand-in
            return _exact(fp32, {**base, "reason": f"the {backend_name} engine is built for another machine and "
                                 f"its {mode} cannot be measured here ({runner.stand_in_note}), so FP32; "
                                 f"--precision {mode} asks for it"})  # fmt: skip
        figures = output_metrics([exact.run(s) for s in samples], [reduced.run(s) for s in samples])
        holds, failures = budget.judge(figures)
        feed = imported.example_inputs
        times = paired_median_ms({"fp32": lambda: exact.run(feed), mode: lambda: reduced.run(feed)}, repeats=15)
    except AdapterError as exc:  # a backend that fails to build or run BF16 leaves FP32 as it was
        return _exact(fp32, {**base, "reason": f"the {mode} engine failed ({str(exc)[:300]}), so FP32"})
    finally:
        runner.close()
    measured = f"{mode} {times[mode]:.2f} ms against FP32 {times['fp32']:.2f} ms"
    if getattr(profile, "name", HOST) != HOST:
        measured += f" on this machine, not a {profile.name}"
    report = {**base, "accuracy": figures, "judged_on": {"samples": len(samples), "source": source},
              "latency_ms": {"fp32": times["fp32"], f"{mode}_tried": times[mode]}}  # fmt: skip
    if not holds:
        return _exact(fp32, {**report, "reason": f"{mode} misses the near-lossless budget ({'; '.join(failures)}), so FP32"})
    if times[mode] > NEAR_LOSSLESS_GAIN * times["fp32"]:
        return _exact(fp32, {**report, "reason": f"{mode} holds the budget but is not faster ({measured}), so FP32"})
    report["latency_ms"] = {"fp32": times["fp32"], "plan": times[mode]}
    plan = default_plan(fp32, mode)
    plan.budget = str(budget)
    plan.measured = {"accuracy": figures, "budget_holds": True, "latency_ms": times[mode], "fp32_latency_ms": times["fp32"]}
    modules, _ = _summarise(plan)
    report.update({
        "mode": mode, "modules": modules, "budget_holds": True, "speedup_vs_fp32": times["fp32"] / times[mode],
        "reason": f"{mode} holds the near-lossless budget and runs {times['fp32'] / times[mode]:.2f}x faster ({measured})",
        "calibration": {"source": source, "evaluated_on": len(samples)},
    })  # fmt: skip
    # the examples and random cases only guard against a broken engine; the budget is
    # judged again against eager PyTorch on the same samples
    tolerance = Tolerance(atol=1e30, rtol=0.0, min_cosine=_MIN_COSINE[mode])
    return PrecisionResult(fp32, plan, report, HINTS[mode], tolerance, [], budget, samples, None)


def lower_precision(
    imported, model: ir.Model, profile: Any, backend, backend_name: str, options: PrecisionOptions,
    cache_dir: Path, progress: Callable[[str], None] | None = None, beat_ms: float | None = None,
) -> PrecisionResult | None:  # fmt: skip
    """Choose and apply precisions; None when the engine stays FP32 with no plan.

    ``beat_ms``: under ``auto``, the latency another backend's engine already reached; a
    mode whose fully lowered engine cannot beat it (nor this backend's best so far) is not
    searched.

    Raises:
        SourceError: Bad mode, budget, calibration data or plan file.
        PrecisionBudgetError: No plan holds the budget (the best one's figures are given).
    """
    say = progress or (lambda _m: None)
    if options.mode not in CHOICES:
        raise SourceError(f"Unknown precision '{options.mode}'.", f"Use one of {', '.join(CHOICES)}.")
    if options.mode == "default" and not options.plan and not options.budget:
        return _near_lossless(imported, model, profile, backend, backend_name, say)
    if options.mode == "default":  # a budget or a plan without a mode: as --precision fp32 did
        options = PrecisionOptions(**{**options.__dict__, "mode": "fp32"})
    if options.mode == "fp32" and not options.plan and not options.budget:
        return None
    warnings: list[str] = []
    budget: Budget | None = parse_budget(options.budget) if options.budget else None
    fp32 = model  # stays as it is: every candidate is lowered on a clone of it
    loaded = PrecisionPlan.load(Path(options.plan)) if options.plan else None
    mode = loaded.mode if loaded else options.mode
    if mode == "auto" and budget is None:
        budget = parse_budget(DEFAULT_AUTO_BUDGET)
        warnings.append(f"--precision auto without --accuracy-budget: using {DEFAULT_AUTO_BUDGET}.")
    candidates = [m for m in AUTO_ORDER if _allowed(m, profile, backend) is None] if mode == "auto" else [mode]
    why = _allowed(mode, profile, backend) if mode != "auto" else None
    if why and mode not in backend.EMULATES:  # e.g. ONNX Runtime runs FP16 through Casts
        raise SourceError(f"Cannot build a {mode} engine: {why}.", "Choose another --precision, --backend or --target.")
    calibration = _calibration(options, imported, warnings)
    calib_samples, held_out = calibration.split()
    runner = _Backend(backend, backend_name, profile, (imported.inputs, imported.outputs))
    try:
        feed = imported.example_inputs
        fp32_engine = runner.engine(fp32, "fp32")
        fp32_ms = median_ms(lambda: fp32_engine.run(feed), warmup=3, repeats=20)
        best_ms, best_from = fp32_ms, "FP32"
        hinted = {"fp32": fp32_ms}  # each hint's latency with nothing lowered in the graph
        if beat_ms is not None and beat_ms < best_ms:
            best_ms, best_from = beat_ms, "another backend's engine"
        mixed = "precision" in backend.BUILD_OPTIONS and _allowed("bf16", profile, backend) is None
        roof = roofline(fp32, imported.inputs, feed, profile) if mode == "auto" else None
        evaluator = Evaluator(
            fp32, calib_samples, held_out, budget or parse_budget("cos>=-1"), runner.runner, cache_dir
        )
        trials = []
        for candidate in candidates:
            say(f"precision {candidate}")
            if roof is not None and not runner.stand_in_note and _has_peak(candidate, profile):
                # no build at all when even the roofline's speed-up over FP32 (the mode's
                # peak and weight width; no measured peak: FP32's) cannot beat the best so far
                estimate = fp32_ms * roof.mode_ms(candidate, profile) / roof.mode_ms("fp32", profile)
                if estimate >= PRUNE * best_ms:
                    trials.append(_skipped(
                        candidate, f"its roofline estimate ({estimate:.2f} ms: FP32's {fp32_ms:.2f} ms scaled by the "
                        f"{peak_key(candidate, profile)} peak and weight width) is not under {PRUNE:g}x the best so far "
                        f"({best_from}: {best_ms:.2f} ms)",
                    ))  # fmt: skip
                    continue
            plan = loaded or _mode_plan(candidate, fp32, calibration, options, cache_dir)
            plan.calibration = {
                "source": calibration.source,
                "digest": calibration.digest(),
                "samples": len(calib_samples),
            }
            if _nncf_quantizes(candidate, backend_name, options, loaded, fp32):
                plan.options["quantizer"] = "nncf"  # OpenVINO's own quantizer (see passes.precision._quantize_nncf)
            if mixed and not loaded and candidate in MIXED_MODES:
                plan.options["hint"] = "bf16"  # the layers it keeps run BF16, not FP32
            hint = plan_hint(plan)
            smoothing, widths, limit = None, {}, None
            if mode == "auto":
                # A mode that fully lowered cannot beat the best so far is not worth a search
                # (timed beside FP32 in rotating blocks; the best so far scaled alike). Before
                # any fitting: a pruned mode costs one calibration and one compile.
                full = apply_plan(fp32, plan, calib_samples, cache_dir)
                ceiling, reference_ms = runner.against(full, hint, fp32_engine, feed)
                scale = reference_ms / fp32_ms  # this timing's FP32 against the first one's
                bar = best_ms * scale
                if ceiling >= PRUNE * bar:
                    trials.append(_skipped(
                        candidate, f"fully lowered it runs {ceiling:.2f} ms, not under {PRUNE:g}x the best so far "
                        f"({best_from}: {bar:.2f} ms; FP32 {reference_ms:.2f} ms, timed in rotating blocks)",
                    ))  # fmt: skip
                    continue
                kept_all = hinted.get(hint)  # every group kept: the graph as is, with the hint
                if kept_all is not None and kept_all * scale > ceiling and plan.mode not in HINTS:
                    gap = (PRUNE * bar - ceiling) / (kept_all * scale - ceiling)
                    limit = max(0, int(group_count(plan) * gap))
            # Weight widths are fitted to this machine's kernels: only for engines that run here.
            refine = _width_fitter(fp32, calib_samples, widths, say) if _fits_widths(plan, loaded, runner) else None
            if "smooth_alpha" in plan.options and budget is not None and not loaded:
                plan, smoothing = choose_option(plan, evaluator, "smooth_alpha", SMOOTH_ALPHAS, say, refine)
            elif refine:
                plan = refine(plan)
            if budget is not None and not loaded:
                ranker = local_error_sensitivity if plan.mode in MIXED_MODES else None  # one run, not a probe per group
                groups = group_count(plan)
                plan, holds = search_plan(plan, evaluator, say, limit, ranker)
                if not holds and limit is not None and limit < groups - 1:  # what holds would keep too much to pay
                    trials.append(_skipped(
                        candidate, f"fully lowered it misses the budget, and keeping more than {limit} of its {groups} "
                        f"groups {hint.upper()} would not run under {PRUNE:g}x the best so far ({best_from})",
                        len(plan.overrides), plan.measured.get("accuracy"),
                    ))  # fmt: skip
                    continue
                if smoothing:
                    plan.measured["smooth_alpha_scores"] = smoothing
            else:
                figures = evaluator.measure(plan)
                holds = budget.judge(figures)[0] if budget else True
                plan.measured = {"accuracy": figures, "budget_holds": holds}
            if widths:
                plan.measured["weight_widths"] = widths[plan.options.get("smooth_alpha")]["errors"]
            lowered = fp32.clone()
            applied = ApplyPrecisionPlan(plan, calib_samples, cache_dir)
            applied(lowered)
            latency, reference_ms = runner.against(lowered, plan_hint(plan), fp32_engine, feed) if holds else (None, None)
            ratio = latency / reference_ms if latency else None
            if latency and latency * fp32_ms / reference_ms < best_ms:
                best_ms, best_from = latency * fp32_ms / reference_ms, candidate
            if latency and plan.mode in HINTS and not plan.overrides:
                hinted[plan_hint(plan)] = latency * fp32_ms / reference_ms
            plan.measured.update(
                {"latency_ms": latency, "fp32_latency_ms": reference_ms or fp32_ms, "ratio_to_fp32": ratio}
            )
            trials.append(
                {
                    "mode": candidate,
                    "holds": holds,
                    "kept_fp32": len(plan.overrides),
                    "latency_ms": latency,
                    "ratio_to_fp32": ratio,
                    "accuracy": plan.measured.get("accuracy"),
                    "_plan": plan,
                    "_model": lowered,
                    "_record": applied.record,
                }
            )
    finally:
        runner.close()
    if runner.stand_in_note:
        warnings.append(
            f"The {backend_name} engine is built for another machine: accuracy and the speed-up over FP32 were "
            f"measured on {runner.stand_in_note}, not on the target."
        )
    holding = [t for t in trials if t["holds"]]
    if mode == "auto" and not any(t["ratio_to_fp32"] < 1.0 for t in holding):
        # FP32 always holds: the answer is then that no lower precision pays here.
        fp32_plan = PrecisionPlan(mode="fp32", budget=str(budget), calibration=plan.calibration if trials else {})
        fp32_plan.measured = {
            "accuracy": None,
            "budget_holds": True,
            "latency_ms": fp32_ms,
            "fp32_latency_ms": fp32_ms,
            "ratio_to_fp32": 1.0,
        }
        holding = [
            {
                "mode": "fp32",
                "holds": True,
                "kept_fp32": 0,
                "latency_ms": fp32_ms,
                "ratio_to_fp32": 1.0,
                "accuracy": None,
                "_plan": fp32_plan,
                "_model": fp32,
                "_record": None,
            }
        ]
        trials += holding
        warnings.append("No lower precision was both faster than FP32 and within the budget: the engine stays FP32.")
    if not holding:
        tried = "; ".join(
            f"{t['mode']}: {t['skipped']}" if t.get("skipped") else
            f"{t['mode']} keeping {t['kept_fp32']} node(s) FP32: "
            + ", ".join(f"{o} cos {v['cos']:.4f} (min {v['cos_min']:.4f}, max-abs {v['max_abs']:.3g})" for o, v in (t["accuracy"] or {}).items())
            for t in trials
        )  # fmt: skip
        raise PrecisionBudgetError(
            f"No precision plan holds the budget {budget}. Best plans found: {tried}.",
            "Loosen --accuracy-budget, give real calibration data (--calib/--calib-text), or use --precision fp32.",
        )
    chosen = min(holding, key=lambda t: t["ratio_to_fp32"])
    plan, lowered, latency = chosen["_plan"], chosen["_model"], chosen["latency_ms"]
    fp32_ms = plan.measured.get("fp32_latency_ms") or fp32_ms
    trials = [{k: v for k, v in t.items() if not k.startswith("_")} for t in trials]
    modules, kept = _summarise(plan)
    report = {
        "requested": options.mode, "mode": plan.mode, "budget": str(budget) if budget else None,
        "calibration": {**plan.calibration, "held_out": len(held_out), "evaluated_on": len(evaluator.samples(plan)), "synthetic": calibration.synthetic},
        "accuracy": plan.measured.get("accuracy"), "budget_holds": plan.measured.get("budget_holds", True),
        "modules": modules, "kept_fp32": kept, "narrow_weights": _narrow(plan),
        "latency_ms": {"fp32": fp32_ms, "plan": latency}, "speedup_vs_fp32": fp32_ms / latency if latency else None,
        "size_bytes": {"fp32": model_size(fp32), "plan": model_size(lowered)},
        "candidates": trials, "search": {"evaluations": evaluator.runs, "seconds": round(evaluator.seconds, 2)},
        "warnings": warnings,
    }  # fmt: skip
    # Random token ids and padded examples are far from real data, so those cases only
    # guard against broken engines (finite, broadly similar, at the positions an attention
    # mask keeps); the budget is judged on the held-out samples against eager PyTorch.
    tolerance = Tolerance(atol=1e30, rtol=0.0, min_cosine=_MIN_COSINE.get(plan.mode, 0.9), skip_padding=True)
    final_budget = budget or parse_budget(f"cos>={_MIN_COSINE.get(plan.mode, 0.99)}")
    return PrecisionResult(
        lowered, plan, report, plan_hint(plan), tolerance, warnings, final_budget, held_out,
        chosen["_record"],
    )  # fmt: skip
