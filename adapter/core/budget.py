"""Accuracy budgets (``--accuracy-budget``) and the metrics they are judged by.

A budget is one or more comma-separated terms ``METRIC OP THRESHOLD``, optionally for
one output: ``cos>=0.999``, ``cos_min>=0.98``, ``max_abs<=1e-2``, ``top1>=0.99``,
``cos[token_embeddings]>=0.995``. Metrics compare a candidate's outputs with the FP32
reference's over the evaluation samples:

* ``cos``: mean cosine similarity of rows (vectors along the last axis, e.g. per token),
  judged by its 95% lower confidence bound; unless ``cos_min`` is given, ``cos>=X`` also
  implies ``cos_min>=1-4(1-X)`` (``cos>=0.995`` implies ``cos_min>=0.98``);
* ``cos_min``: the lowest such row cosine;
* ``max_abs``: the largest absolute difference;
* ``max_rel``: the largest absolute difference over the reference's largest magnitude
  (a max-abs bound that scales with the output);
* ``top1``: the share of rows whose arg-max agrees (classifiers).
"""

from __future__ import annotations

__all__ = ["Term", "Budget", "parse_budget", "output_metrics"]

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adapter.core.errors import SourceError

METRICS = {"cos": ">=", "cos_min": ">=", "max_abs": "<=", "max_rel": "<=", "top1": ">="}
_TERM = re.compile(r"^\s*(\w+)(?:\[([\w.:/-]+)\])?\s*(>=|<=)\s*([0-9.eE+-]+)\s*$")


@dataclass(frozen=True)
class Term:
    """One condition of a budget."""

    metric: str
    op: str
    threshold: float
    output: str | None = None

    def holds(self, value: float) -> bool:
        return value >= self.threshold if self.op == ">=" else value <= self.threshold

    def __str__(self) -> str:
        target = f"[{self.output}]" if self.output else ""
        return f"{self.metric}{target}{self.op}{self.threshold:g}"


@dataclass(frozen=True)
class Budget:
    """All terms must hold for every output they name (or every output)."""

    terms: tuple[Term, ...] = field(default_factory=tuple)

    def __str__(self) -> str:
        return ",".join(str(t) for t in self.terms)

    def judge(self, figures: dict[str, dict[str, float]]) -> tuple[bool, list[str]]:
        """Check per-output figures; return (holds, the failing terms with their values).

        A mean cosine is judged by its 95% lower confidence bound, so a plan that only
        just holds on the held-out samples is not taken for one that holds on new data.
        """
        failures = []
        for term in self.terms:
            for name, values in figures.items():
                if term.output not in (None, name):
                    continue
                value = _judged(term, values)
                if not term.holds(value):
                    shown = f"{values[term.metric]:.6g}" + (f" (95% lower bound {value:.6g})" if value != values[term.metric] else "")
                    failures.append(f"{term.metric}[{name}]={shown}, need {term.op}{term.threshold:g}")
        return not failures, failures

    def score(self, figures: dict[str, dict[str, float]]) -> float:
        """How far the worst term is from failing, relative to its threshold (higher is better)."""
        margins = []
        for term in self.terms:
            for name, values in figures.items():
                if term.output in (None, name):
                    value = _judged(term, values)
                    scale = abs(term.threshold) or 1.0
                    margin = (value - term.threshold) if term.op == ">=" else (term.threshold - value)
                    margins.append(margin / scale)
        return min(margins) if margins else 0.0


def _judged(term: Term, values: dict[str, float]) -> float:
    if term.metric == "cos" and "cos_lcb" in values:
        return values["cos_lcb"]
    return values[term.metric]


def parse_budget(text: str) -> Budget:
    """Parse an ``--accuracy-budget`` string.

    Raises:
        SourceError: The text is not a list of ``METRIC>=X`` / ``METRIC<=X`` terms.
    """
    terms = []
    for part in text.split(","):
        match = _TERM.match(part)
        if not match:
            raise SourceError(
                f"Cannot read the accuracy budget term '{part.strip()}' in '{text}'.",
                "Write terms like cos>=0.999, cos_min>=0.98, max_abs<=1e-2 or top1>=0.99, comma-separated.",
            )
        metric, output, op, number = match.groups()
        if metric not in METRICS:
            raise SourceError(f"Unknown accuracy metric '{metric}' in '{text}'.", f"Known metrics: {', '.join(METRICS)}.")
        if op != METRICS[metric]:
            raise SourceError(f"'{part.strip()}' bounds {metric} the wrong way.", f"Write {metric}{METRICS[metric]}X.")
        try:
            threshold = float(number)
        except ValueError as exc:
            raise SourceError(f"'{number}' in the accuracy budget is not a number.") from exc
        terms.append(Term(metric, op, threshold, output))
    # A mean cosine alone lets a few rows (tokens) go badly wrong; unless the budget bounds
    # the minimum itself, the minimum may fall at most four times as far below 1 as the mean.
    for term in list(terms):
        if term.metric == "cos" and not any(t.metric == "cos_min" and t.output == term.output for t in terms):
            terms.append(Term("cos_min", ">=", round(1 - 4 * (1 - term.threshold), 6), term.output))
    return Budget(tuple(terms))


def _rows(value: np.ndarray) -> np.ndarray:
    value = np.asarray(value, dtype=np.float64)
    return value.reshape(-1, value.shape[-1]) if value.ndim >= 2 else value.reshape(1, -1)


def output_metrics(reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    """Every metric per output, pooled over the samples."""
    figures: dict[str, dict[str, Any]] = {}
    for name in reference[0]:
        per_sample = [(_rows(r[name]), _rows(c[name])) for r, c in zip(reference, candidate)]
        ref_rows = np.concatenate([r for r, _ in per_sample])
        cand_rows = np.concatenate([c for _, c in per_sample])
        norms = np.linalg.norm(ref_rows, axis=1) * np.linalg.norm(cand_rows, axis=1)
        dots = np.sum(ref_rows * cand_rows, axis=1)
        cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1), (np.abs(ref_rows - cand_rows).max(axis=1) == 0).astype(float))
        finite = np.isfinite(cand_rows).all()
        # Rows of one sample (tokens of one sentence) are not independent: the confidence
        # bound of the mean uses the spread of per-sample means.
        bounds = np.cumsum([0] + [len(r) for r, _ in per_sample])
        sample_means = np.array([cos[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:]) if b > a])
        spread = 2 * float(sample_means.std(ddof=1)) / np.sqrt(len(sample_means)) if len(sample_means) > 1 else 0.0
        figures[name] = {
            "cos": float(cos.mean()) if finite else -1.0,
            "cos_lcb": float(cos.mean() - spread) if finite else -1.0,
            "cos_min": float(cos.min()) if finite else -1.0,
            "max_abs": float(np.abs(ref_rows - cand_rows).max()) if finite else float("inf"),
            "max_rel": float(np.abs(ref_rows - cand_rows).max() / max(float(np.abs(ref_rows).max()), 1e-30))
            if finite else float("inf"),
            "top1": float(np.mean(ref_rows.argmax(axis=1) == cand_rows.argmax(axis=1))),
            "finite": bool(finite),
        }
    return figures
