"""Verify a decoder engine against the eager model, from answers computed once.

:class:`EagerReference` runs the eager model once per convert and keeps what every check
compares against: the logits of a left-padded prefill and 4 teacher-forced decode steps,
transformers' own greedy tokens, and the FP32 logits over held-out prompts and their greedy
continuations. A few megabytes; so the eager model (TinyLlama: 4.4 GB of FP32 weights) can
be let go before the engines are built, and the ladder of INT4 rungs and the candidates of
a race do not each re-run the eager model (TinyLlama: ~10 s per check on 2 cores).

The checks:
* FP32 weights: prefill logits of a left-padded batch of two prompts and 4 teacher-forced
  decode steps (max-abs, cosine), and greedy tokens over ``verify_steps`` steps equal to
  transformers' own ``generate`` (no early stop);
* reduced weights: next-token KL divergence to eager FP32 over every position of held-out
  prompts (teacher-forced on eager's greedy continuation) against ``kl_budget``, and the
  greedy-token agreement over those positions.
"""

from __future__ import annotations

__all__ = ["EagerReference", "eager_greedy", "kl_against_eager", "verify_decoder"]

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from adapter.core.errors import VerificationError
from adapter.core.verify import Tolerance, compare
from adapter.llm.export import eager_step
from adapter.llm.generate import generate, left_pad
from adapter.llm.layout import DecoderLayout

KL_STEPS = 16
"""Greedy continuation per held-out prompt in the KL check (at most ``verify_steps``)."""


def prompts(layout: DecoderLayout, count: int, length: int, seed: int) -> list[list[int]]:
    """``count`` random prompts of about ``length`` ids, clear of the usual special ids."""
    rng = np.random.default_rng(seed)
    low = 3 if layout.vocab_size > 8 else 0
    return [rng.integers(low, layout.vocab_size, size=max(1, length - 3 * i)).tolist() for i in range(count)]


def eager_greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens of the eager model through transformers' own cache (no end-of-sequence stop)."""
    from transformers import DynamicCache  # heavy (~1.5 s); only the eager checks need it

    cache, ids, tokens = DynamicCache(), torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, return_dict=True)
            cache = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
            ids = torch.tensor([[tokens[-1]]])
    return tokens


@dataclass(frozen=True)
class Step:
    """One step of the FP32 check: what the engine is fed and eager's logits for it."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    logits: np.ndarray


@dataclass(frozen=True)
class EagerReference:
    """The eager model's answers to every check of one weight format (see the module)."""

    steps: tuple[Step, ...] = ()
    """FP32: a left-padded prefill of two prompts, then 4 teacher-forced decode steps."""
    greedy_prompt: tuple[int, ...] = ()
    greedy: tuple[int, ...] = ()
    """FP32: transformers' greedy tokens after ``greedy_prompt`` (``verify_steps`` of them)."""
    held_out: tuple[tuple[tuple[int, ...], np.ndarray], ...] = ()
    """Reduced weights: (prompt + eager's greedy continuation, eager FP32 logits at every position)."""

    @classmethod
    def of(cls, model: torch.nn.Module, layout: DecoderLayout, weights: str, verify_steps: int = 32) -> EagerReference:
        """Run the eager model for the checks a ``weights`` engine gets."""
        if weights == "fp32":
            prompt = prompts(layout, 1, 8, seed=3)[0]
            return cls(
                steps=_teacher_forced(model, layout),
                greedy_prompt=tuple(prompt),
                greedy=tuple(eager_greedy(model, prompt, verify_steps)),
            )
        return cls(held_out=held_out(model, layout, min(verify_steps, KL_STEPS)))


def _teacher_forced(model: torch.nn.Module, layout: DecoderLayout) -> tuple[Step, ...]:
    """Prefill a left-padded batch of two prompts, then 4 decode steps on eager's own argmax."""
    batch = prompts(layout, 2, 9, seed=1)
    ids, mask, positions = left_pad(batch, layout.pad_token_id or 0)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    for name in layout.past_names():
        feeds[name] = np.zeros(layout.cache_shape(len(batch), 0), np.float32)
    steps = []
    for _ in range(5):
        expected = eager_step(model, feeds, layout)
        steps.append(Step(feeds["input_ids"], feeds["attention_mask"], feeds["position_ids"], expected["logits"]))
        nxt = expected["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
        feeds = {
            "input_ids": nxt,
            "attention_mask": np.concatenate([feeds["attention_mask"], np.ones((len(batch), 1), np.int64)], axis=1),
            "position_ids": feeds["position_ids"][:, -1:] + 1,
            **{p: expected[q] for p, q in zip(layout.past_names(), layout.present_names())},
        }
    return tuple(steps)


def held_out(model: torch.nn.Module, layout: DecoderLayout, steps: int) -> tuple[tuple[tuple[int, ...], np.ndarray], ...]:
    """Three held-out prompts with eager's greedy continuation and eager's logits over all of it."""
    found = []
    for prompt in prompts(layout, 3, 12, seed=7):
        sequence = prompt + eager_greedy(model, prompt, steps)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([sequence]), use_cache=False).logits[0].float().numpy()
        found.append((tuple(sequence), logits))
    return tuple(found)


def _compare(actual: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    result = compare(actual, expected, Tolerance())
    return {"max_abs": result["max_abs"], "cosine": result["cosine"]}


def _worst(rows: list[dict[str, float]]) -> dict[str, float]:
    return {"max_abs": max(r["max_abs"] for r in rows), "cosine": min(r["cosine"] for r in rows)}


def _steps_against_eager(session, reference: EagerReference) -> dict[str, Any]:
    first = reference.steps[0]
    session.start(first.input_ids.shape[0], first.input_ids.shape[1] + len(reference.steps))
    rows = []
    for step in reference.steps:
        actual = session.step(step.input_ids, step.attention_mask, step.position_ids)
        valid = step.attention_mask[:, -actual.shape[1] :].astype(bool)  # padded rows' logits are free
        rows.append(_compare(actual[valid], step.logits[valid]))
    return {"prefill": rows[0], "decode": _worst(rows[1:]), "decode_steps": len(rows) - 1}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_against_eager(session, reference: EagerReference | torch.nn.Module, layout: DecoderLayout,
                     steps: int = KL_STEPS) -> dict[str, Any]:  # fmt: skip
    """Next-token KL to eager FP32 and greedy agreement, teacher-forced on eager's continuation
    (``reference``: an :class:`EagerReference` for reduced weights, or the eager model)."""
    pairs = reference.held_out if isinstance(reference, EagerReference) else held_out(reference, layout, steps)
    kls, agree, total = [], 0, 0
    for sequence, expected in pairs:
        session.start(1, len(sequence))
        arr = np.array([sequence], np.int64)
        actual = session.step(arr, np.ones_like(arr), np.arange(len(sequence))[None])[0]
        p, q = _log_softmax(expected), _log_softmax(actual)
        kls.append((np.exp(p) * (p - q)).sum(-1))
        agree += int((expected.argmax(-1) == actual.argmax(-1)).sum())
        total += len(sequence)
    kl = np.concatenate(kls)
    return {
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "greedy_agreement": agree / total,
        "positions": total,
    }


def verify_decoder(
    session, reference: EagerReference | torch.nn.Module, layout: DecoderLayout, weights: str, options: Any
) -> dict[str, Any]:
    """Check a decoder session against eager (``reference``, or the eager model itself);
    raise when it misses the budget. ``options`` carries ``verify_steps``, ``max_abs`` and
    ``kl_budget`` (:class:`~adapter.llm.convert.LLMOptions`).

    Raises:
        VerificationError: FP32 logits off by more than ``max_abs``, greedy tokens that
            differ, or a reduced-weight KL over ``kl_budget``.
    """
    if not isinstance(reference, EagerReference):
        reference = EagerReference.of(reference, layout, weights, options.verify_steps)
    if not (reference.steps if weights == "fp32" else reference.held_out):
        raise ValueError(f"This eager reference was made for another weight format than {weights}.")
    if weights == "fp32":
        report = _steps_against_eager(session, reference)
        expected = list(reference.greedy)
        got = generate(session, layout, [list(reference.greedy_prompt)], len(expected), stop_at_eos=False).tokens[0]
        first_diff = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
        report["greedy"] = {"steps": len(expected), "equal": got == expected, "first_difference": first_diff}
        worst = max(report["prefill"]["max_abs"], report["decode"]["max_abs"])
        report["passed"] = worst <= options.max_abs and got == expected
        if not report["passed"]:
            raise VerificationError(
                f"The FP32 decoder differs from eager PyTorch: logits max-abs {worst:.2e} (bound "
                f"{options.max_abs:.0e}); greedy tokens {'equal' if got == expected else f'differ from step {first_diff}'}.",
                "Report the model's config; try the other backend with --backend.",
            )
        return report
    report = kl_against_eager(session, reference, layout)
    report["kl_budget"] = options.kl_budget
    report["passed"] = report["kl_mean"] <= options.kl_budget
    if not report["passed"]:
        raise VerificationError(
            f"The {weights} decoder's next-token KL divergence to FP32 is {report['kl_mean']:.4f}, over the "
            f"budget {options.kl_budget}.",
            "Use a smaller --group-size, keep more layers FP32, or --weights int8.",
        )
    return report
