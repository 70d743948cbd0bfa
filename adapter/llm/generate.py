"""The generation loop over a backend's decoder session: batching, sampling, stopping, figures.

Prompts of different lengths are left-padded into one batch (padding masked out, positions
counted from each row's first real token, as Hugging Face does), prefilled in one step,
then decoded one token per row per step; a row that produced an end-of-sequence token
stops collecting tokens while the others go on. Sampling is greedy at temperature 0, else
temperature, top-k and top-p (nucleus) from a seeded NumPy generator, so a seed repeats.
"""

from __future__ import annotations

__all__ = ["Sampling", "Generation", "generate", "pick", "left_pad"]

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from adapter.core.errors import InputMismatchError
from adapter.core.mapped import resident_bytes


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy at ``temperature`` 0."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Generation:
    """Tokens generated per prompt and the run's figures."""

    tokens: list[list[int]]
    prompt_lengths: list[int]
    ttft_ms: float
    decode_tokens_per_s: float
    decode_steps: int
    total_ms: float
    peak_rss_mb: float
    """The process's peak resident memory so far (loading the engine included)."""
    rss_mb: float = 0.0
    """Resident memory when the generation ended (after loading's transient copies are gone)."""
    finished: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "tokens": self.tokens,
            "prompt_lengths": self.prompt_lengths,
            "time_to_first_token_ms": round(self.ttft_ms, 3),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            "decode_steps": self.decode_steps,
            "total_ms": round(self.total_ms, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "rss_mb": round(self.rss_mb, 1),
            "finished": self.finished,
        }


def left_pad(prompts: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids, attention mask and position ids of a left-padded batch."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions


def pick(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """The next token per row from last-position logits (batch, vocab)."""
    if sampling.temperature <= 0:
        return logits.argmax(axis=-1)
    scaled = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k and sampling.top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -sampling.top_k, axis=-1)[:, -sampling.top_k][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if sampling.top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        keep_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs < sampling.top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs], dtype=np.int64)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mb() -> float:
    """Resident memory now (Linux's /proc; the peak elsewhere)."""
    now = resident_bytes()
    return _peak_rss_mb() if now is None else now / 2**20


def generate(
    session,
    layout,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_at_eos: bool = True,
    on_tokens: Callable[[int, list[int]], None] | None = None,
) -> Generation:
    """Generate up to ``max_new_tokens`` per prompt with a decoder session.

    Args:
        session: A backend's ``DecoderSession`` (``start``, ``step``).
        layout: The engine's ``DecoderLayout`` (vocabulary, positions, special tokens).
        prompts: Token ids per prompt (lengths may differ).
        on_tokens: Called after every step with the step index and each row's new token
            (streaming).

    Raises:
        InputMismatchError: Empty prompts, ids outside the vocabulary, or a context
            (longest prompt + new tokens) beyond the model's positions.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputMismatchError("Every prompt needs at least one token.")
    bad = sorted({t for p in prompts for t in p if not 0 <= t < layout.vocab_size})
    if bad:
        raise InputMismatchError(
            f"Token ids {bad[:8]} are outside the model's vocabulary of {layout.vocab_size}.",
            "Give ids from the model's tokenizer.",
        )
    width = max(len(p) for p in prompts)
    context = width + max_new_tokens
    if context > layout.max_positions:
        raise InputMismatchError(
            f"A prompt of {width} tokens plus {max_new_tokens} new ones needs {context} positions; the model "
            f"has {layout.max_positions}.",
            "Shorten the prompt or ask for fewer new tokens.",
        )
    rng = np.random.default_rng(sampling.seed)
    pad = layout.pad_token_id if layout.pad_token_id is not None else 0
    ids, mask, positions = left_pad(prompts, pad)
    batch = len(prompts)
    eos = set(layout.eos_token_ids) if stop_at_eos else set()
    started = time.perf_counter()
    session.start(batch, context)
    logits = session.step(ids, mask, positions, last_only=True)
    first = time.perf_counter()
    tokens: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(batch, bool)
    next_pos = positions[:, -1] + 1
    steps = 0
    for step in range(max_new_tokens):
        chosen = pick(logits[:, -1, :], sampling, rng)
        for row in range(batch):
            if not done[row]:
                tokens[row].append(int(chosen[row]))
                done[row] = int(chosen[row]) in eos
        if on_tokens is not None:
            on_tokens(step, [int(t) for t in chosen])
        if done.all() or step == max_new_tokens - 1:
            break
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        logits = session.step(chosen[:, None].astype(np.int64), mask, next_pos[:, None], last_only=True)
        next_pos = next_pos + 1
        steps += 1
    ended = time.perf_counter()
    decode_s = ended - first
    return Generation(
        tokens=tokens,
        prompt_lengths=[len(p) for p in prompts],
        ttft_ms=(first - started) * 1e3,
        decode_tokens_per_s=(steps * batch / decode_s) if steps and decode_s > 0 else 0.0,
        decode_steps=steps,
        total_ms=(ended - started) * 1e3,
        peak_rss_mb=_peak_rss_mb(),
        rss_mb=_rss_mb(),
        finished=["eos" if d else "length" for d in done],
    )
