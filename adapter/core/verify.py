"""Verify an engine against the eager model on the same inputs.

Cases: the example inputs, then fresh random inputs at the dynamic dims' minimum and
at random sizes within the declared ranges. Per output: max-abs error, cosine
similarity, and NaN/Inf agreement.
"""

from __future__ import annotations

__all__ = ["Tolerance", "random_inputs", "verification_cases", "compare", "verify"]

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from adapter.core.budget import output_metrics
from adapter.core.errors import VerificationError
from adapter.core.specs import Dim, TensorSpec


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria per output (FP32 defaults from the foundation issue)."""

    atol: float = 1e-4
    """Absolute error allowed on top of the relative part."""
    rtol: float = 1e-5
    """Error allowed relative to the largest reference magnitude of the output."""
    min_cosine: float = 0.99999
    """Lowest cosine similarity between flattened engine and reference outputs."""
    skip_padding: bool = False
    """Compare an output whose leading axes are the ``attention_mask`` input's ([batch,
    seq, ...], more axes than the mask) only at the positions the mask keeps: what a model
    computes for padding is read by nobody (pooling and attention leave it out), and a
    statically calibrated INT8 engine need not match it. Set for reduced-precision plans,
    whose guard cases these are."""


def _dim_sizes(specs: list[TensorSpec], examples: dict[str, np.ndarray] | None) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for spec in specs:
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, Dim) and dim.name not in sizes:
                if examples and spec.name in examples:
                    sizes[dim.name] = int(examples[spec.name].shape[axis])
                else:
                    sizes[dim.name] = int(np.clip(2, dim.min, dim.max))
    return sizes


def random_inputs(
    specs: list[TensorSpec],
    examples: dict[str, np.ndarray] | None,
    rng: np.random.Generator,
    sizes: dict[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Fresh inputs following the specs, with values drawn like the examples'."""
    sizes = {**_dim_sizes(specs, examples), **(sizes or {})}
    feed = {}
    for spec in specs:
        shape = tuple(sizes[d.name] if isinstance(d, Dim) else d for d in spec.shape)
        dtype = np.dtype(spec.dtype)
        example = examples.get(spec.name) if examples else None
        if dtype == np.bool_:
            feed[spec.name] = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            lo, hi = (int(example.min()), int(example.max())) if example is not None and example.size else (0, 1)
            feed[spec.name] = rng.integers(lo, hi + 1, size=shape, dtype=dtype)
        else:
            mean, std = (
                (float(example.mean()), float(example.std()) or 1.0)
                if example is not None and example.size
                else (0.0, 1.0)
            )
            feed[spec.name] = rng.normal(mean, std, size=shape).astype(dtype)
    return feed


def verification_cases(
    specs: list[TensorSpec], examples: dict[str, np.ndarray], samples: int = 2, seed: int = 0
) -> list[tuple[str, dict[str, np.ndarray]]]:
    """The example inputs, then ``samples`` random cases at other dynamic sizes."""
    rng = np.random.default_rng(seed)
    cases = [("example", examples)]
    dims = {d.name: d for s in specs for d in s.shape if isinstance(d, Dim)}
    base = _dim_sizes(specs, examples)
    for index in range(samples):
        if index == 0 and dims:
            sizes = {name: dim.min for name, dim in dims.items()}
        else:
            sizes = {
                name: int(rng.integers(dim.min, max(dim.min, min(dim.max, 2 * base[name] + 1)) + 1))
                for name, dim in dims.items()
            }
        label = ",".join(f"{k}={v}" for k, v in sizes.items()) or "fixed shape"
        cases.append((f"random {label}", random_inputs(specs, examples, rng, sizes)))
    return cases


def compare(actual: np.ndarray, expected: np.ndarray, tol: Tolerance) -> dict[str, Any]:
    """Max-abs error, cosine similarity and NaN/Inf agreement of one output."""
    result: dict[str, Any] = {"shape": list(expected.shape)}
    if actual.shape != expected.shape:
        return {**result, "passed": False, "problem": f"shape {list(actual.shape)} vs {list(expected.shape)}"}
    a = actual.astype(np.float64).ravel()
    e = expected.astype(np.float64).ravel()
    finite_a, finite_e = np.isfinite(a), np.isfinite(e)
    if not np.array_equal(finite_a, finite_e) or not np.array_equal(a[~finite_e], e[~finite_e]):
        result["problem"] = "NaN/Inf differ from the reference"
    a, e = a[finite_e & finite_a], e[finite_e & finite_a]
    max_abs = float(np.max(np.abs(a - e))) if a.size else 0.0
    norm = float(np.linalg.norm(a) * np.linalg.norm(e))
    cosine = float(np.dot(a, e) / norm) if norm > 0 else float(np.array_equal(a, e))
    bound = tol.atol + tol.rtol * (float(np.max(np.abs(e))) if e.size else 0.0)
    passed = "problem" not in result and max_abs <= bound and cosine >= tol.min_cosine
    return {**result, "max_abs": max_abs, "cosine": cosine, "bound": bound, "passed": passed}


def _kept_positions(feed: dict[str, np.ndarray]) -> np.ndarray | None:
    """The ``attention_mask`` input's kept positions (a boolean [batch, seq]); None when
    there is no such mask or it keeps nothing (then every position is compared)."""
    mask = feed.get("attention_mask")
    if mask is None or np.asarray(mask).ndim != 2 or not np.asarray(mask).any():
        return None
    return np.asarray(mask) != 0


def verify(
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    reference: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    specs: list[TensorSpec],
    examples: dict[str, np.ndarray],
    tol: Tolerance = Tolerance(),
    samples: int = 2,
) -> dict[str, Any]:
    """Run engine and reference on every case; raise with the figures when over tolerance.

    Returns:
        A JSON-ready report: tolerance, per case and output figures, and the worst
        figures per output.

    Raises:
        VerificationError: An output is over tolerance in some case.
    """
    cases = []
    worst: dict[str, dict[str, float]] = {}
    for name, feed in verification_cases(specs, examples, samples):
        expected = reference(feed)
        actual = run(feed)
        outputs = {}
        keep = _kept_positions(feed) if tol.skip_padding else None
        for out_name, ref in expected.items():
            got, ref = np.asarray(actual[out_name]), np.asarray(ref)
            if keep is not None and got.shape == ref.shape and ref.ndim > keep.ndim and ref.shape[: keep.ndim] == keep.shape:
                got, ref = got[keep], ref[keep]
            figures = compare(got, ref, tol)
            outputs[out_name] = figures
            slot = worst.setdefault(out_name, {"max_abs": 0.0, "cosine": 1.0})
            slot["max_abs"] = max(slot["max_abs"], figures.get("max_abs", float("inf")))
            slot["cosine"] = min(slot["cosine"], figures.get("cosine", 0.0))
        cases.append({"case": name, "outputs": outputs})
    report = {"tolerance": asdict(tol), "cases": cases, "worst": worst}
    report["passed"] = all(o["passed"] for c in cases for o in c["outputs"].values())
    if not report["passed"]:
        failures = [
            f"{o_name} in case '{c['case']}': "
            + (
                o.get("problem")
                or f"max-abs {o['max_abs']:.3g} (allowed {o['bound']:.3g}), cosine {o['cosine']:.7f} (need {tol.min_cosine})"
            )
            for c in cases
            for o_name, o in c["outputs"].items()
            if not o["passed"]
        ]
        error = VerificationError(
            "The engine's outputs differ from the reference beyond tolerance: " + "; ".join(failures) + ".",
            "Loosen --atol/--rtol/--min-cosine only if the difference is expected, or try another backend.",
        )
        error.report = report
        raise error
    return report


def verify_budget(
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    reference: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    samples: list[dict[str, np.ndarray]],
    budget: Any,
) -> dict[str, Any]:
    """Judge a reduced-precision engine against the eager model with an accuracy budget.

    The metrics are pooled over ``samples`` (real held-out data when the user gave
    calibration data), as the precision search measured them.

    Raises:
        VerificationError: The budget does not hold against eager PyTorch.
    """
    figures = output_metrics([reference(s) for s in samples], [run(s) for s in samples])
    holds, failures = budget.judge(figures)
    report = {"budget": str(budget), "samples": len(samples), "figures": figures, "passed": holds}
    if not holds:
        error = VerificationError(
            f"Against eager PyTorch on {len(samples)} held-out samples the engine misses the budget {budget}: "
            + "; ".join(failures) + ".",
            "Give calibration data like the real inputs, or loosen --accuracy-budget.",
        )
        error.report = report
        raise error
    return report
