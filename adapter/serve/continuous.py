"""Continuous batching for generation: requests join and leave the running batch at every step.

One engine thread owns the decoder's rows (``session.slots(rows, capacity)``: a KV buffer
allocated once for ``rows`` requests of up to ``capacity`` positions, see
``backends/_ort_decoder.OrtSlots``). Between two decode steps it admits waiting requests —
each prefilled alone into a free row, its first token sampled at once — then runs one
decode step for every active row together and hands each request its token. A request that
ends (its ``max_tokens``, an end-of-sequence or stop token) leaves at that step and its row is
reused. With ``chunk``, a prompt is prefilled ``chunk`` tokens at a time, one chunk between two
decode steps (chunked prefill: a long prompt arriving delays the running rows' next token by
one chunk, not by the whole prompt); with ``budget`` (whole prompts) the prompts admitted
between two steps stop once that many prompt tokens went in; a client that goes away is
dropped the same way. The rows stay aligned on a common
width (padding masked); when the width reaches the capacity, every row's cache moves left by
the padding all rows share, and a row that itself fills the capacity ends with ``length``.

Requests wait in a bounded queue (:class:`QueueFull` when it is full); a prompt that cannot
fit the capacity with its ``max_tokens`` is refused at once (:class:`TooLong`).
"""

from __future__ import annotations

__all__ = ["Completion", "ContinuousBatcher", "QueueFull", "TooLong"]

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from adapter.llm.generate import Sampling, pick


class QueueFull(Exception):
    """No room in the waiting queue."""


class TooLong(Exception):
    """The prompt and its new tokens do not fit a row."""


@dataclass(eq=False)
class Completion:
    """One request: its prompt, limits and sampling; ``emit(token | None, reason)`` gets its tokens."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    emit: Callable[[int | None, str | None], None]
    stop: frozenset[int] = frozenset()
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)
    rng: np.random.Generator | None = None


@dataclass(eq=False)
class _Filling:
    """A request whose prompt is being prefilled, chunk by chunk, into row ``index``."""

    request: Completion
    index: int
    written: int = 0
    end: int = 0
    """Where its tokens end in its row (the next chunk moves them to end where it starts)."""


@dataclass(eq=False)
class _Row:
    request: Completion
    mask: np.ndarray
    """Mask of this row's positions ``[0, width)``: 1 where it has a token."""
    position: int
    last: int


class ContinuousBatcher:
    """The engine thread and its queue (see the module docstring)."""

    def __init__(self, session, layout, rows: int = 8, capacity: int = 512, max_queue: int = 64,
                 on_step: Callable[[int, int], None] = lambda active, waiting: None, chunk: int = 0,
                 budget: int = 0) -> None:  # fmt: skip
        self.slots = self._open(session, rows, capacity)
        self.chunk = chunk
        self.budget = budget
        """Prompt tokens prefilled between two decode steps while rows run (0: no limit; the
        first prompt or chunk always goes)."""
        self.filling: _Filling | None = None
        self.layout, self.rows, self.capacity, self.max_queue = layout, rows, capacity, max_queue
        self.waiting: queue.Queue[Completion] = queue.Queue()
        self.on_step = on_step
        self.eos = frozenset(layout.eos_token_ids)
        self.active: list[_Row] = []
        self.width = 0
        self.stopped = threading.Event()
        self.last_error: str | None = None
        self.failures = 0
        self.thread = threading.Thread(target=self._loop, name="adapter-generate", daemon=True)

    @staticmethod
    def _open(session, rows: int, capacity: int):
        return session.slots(rows, capacity)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=30)

    def submit(self, request: Completion) -> None:
        """Queue a request.

        Raises:
            TooLong: ``prompt + max_tokens`` is over the row capacity.
            QueueFull: ``max_queue`` requests already wait.
        """
        if len(request.prompt) + request.max_tokens > self.capacity:
            raise TooLong(f"{len(request.prompt)} prompt tokens + max_tokens {request.max_tokens} is more than the "
                          f"{self.capacity} positions a request may use here.")  # fmt: skip
        if self.waiting.qsize() >= self.max_queue:
            raise QueueFull(f"{self.waiting.qsize()} requests are already waiting (the limit is {self.max_queue}).")
        request.rng = np.random.default_rng(request.sampling.seed)
        self.waiting.put(request)

    # -- the engine thread

    def _loop(self) -> None:
        while not self.stopped.is_set():
            try:
                self._admit()
                if not self._busy():
                    continue
                self._step()
            except Exception as exc:  # the engine failed: its requests get the error, the loop goes on
                self._fail(f"error: {str(exc).splitlines()[0][:400] if str(exc) else type(exc).__name__}")
                continue
            self.on_step(len(self.active), self.waiting.qsize() + self._filling())

    def _busy(self) -> bool:
        """Whether there is a step to run (rows decoding)."""
        return bool(self.active)

    def _filling(self) -> int:
        """Requests out of the queue whose prompts are not all in yet."""
        return int(self.filling is not None)

    def _fail(self, reason: str) -> None:
        """End every running and filling request with ``reason`` (an engine step failed); the
        next requests start from empty rows (a broken engine fails them the same way)."""
        self.last_error = reason
        self.failures += 1
        for row in self.active:
            row.request.emit(None, reason)
        if self.filling is not None:
            self.filling.request.emit(None, reason)
        self.active, self.filling, self.width = [], None, 0

    def _admit(self) -> None:
        """Start a waiting request when a row is free, then prefill its next chunk (the whole
        prompt without ``chunk``): between two decode steps at most one chunk runs, so the
        running rows wait at most one chunk's time for their next token. With ``budget`` whole
        prompts are admitted until that many prompt tokens went in since the last step."""
        spent = 0
        while len(self.active) < self.rows:
            if self.budget and self.active and spent >= self.budget:
                break
            if self.filling is None:
                try:
                    request = self.waiting.get(timeout=0.05 if not self.active else 0)
                except queue.Empty:
                    return
                if request.cancelled:
                    continue
                self.filling = _Filling(request, len(self.active))
            spent += min(self.chunk or len(self.filling.request.prompt), len(self.filling.request.prompt))
            if self._prefill_chunk() or self.chunk:
                break
        self._drop_finished()

    def _prefill_chunk(self) -> bool:
        """One chunk of the filling request's prompt; True when the request still has chunks."""
        f = self.filling
        if f.request.cancelled:
            self.filling = None
            return False
        prompt = f.request.prompt
        written = f.written
        size = min(self.chunk or len(prompt), len(prompt) - written)
        wanted = written + size
        if not self.active:
            self.width = wanted
        elif wanted > self.width:  # the row needs more width: every running row moves right, padded left
            self.slots.shift(len(self.active), self.width, wanted - self.width)
            for row in self.active:
                row.mask = np.concatenate([np.zeros(wanted - self.width, np.int64), row.mask])
            self.width = wanted
        if written and f.end != self.width - size:  # the chunks so far end where this one starts
            self.slots.shift_row(f.index, f.end - written, written, self.width - size - f.end)
        mask = np.zeros(self.width, np.int64)
        mask[self.width - wanted :] = 1
        try:
            logits = self.slots.prefill(f.index, np.asarray(prompt[written:wanted]), mask, written)
        except Exception as exc:  # the request gets the engine's error, the others go on
            f.request.emit(None, f"error: {exc}")
            self.filling = None
            return False
        f.written, f.end = wanted, self.width
        if wanted < len(prompt):
            return True
        self.filling = None
        row = _Row(f.request, mask, len(prompt), -1)
        self.active.append(row)
        self._take(row, logits)
        return False

    def _take(self, row: _Row, logits: np.ndarray) -> None:
        request = row.request
        token = int(pick(logits[None], request.sampling, request.rng)[0])
        request.tokens.append(token)
        row.last = token
        reason = None
        if token in self.eos or token in request.stop:
            reason = "stop"
        elif len(request.tokens) >= request.max_tokens:
            reason = "length"
        request.emit(token, reason)
        if reason:
            request.cancelled = True  # finished: leaves at the next clean-up

    def _step(self) -> None:
        if self.width + 1 > self.capacity:
            self._make_room()
            if not self.active:
                return
        n = len(self.active)
        masks = np.stack([np.concatenate([row.mask, [1]]) for row in self.active])
        tokens = np.array([row.last for row in self.active], np.int64)
        positions = np.array([row.position for row in self.active], np.int64)
        logits = self.slots.decode(tokens, masks, positions)
        self.width += 1
        for i, row in enumerate(self.active[:n]):
            row.mask = masks[i]
            row.position += 1
            if not row.request.cancelled:
                self._take(row, logits[i])
        self._drop_finished()

    def _make_room(self) -> None:
        """Move every row left by the padding all share; end the rows that fill a whole row."""
        free = min(int(np.argmax(row.mask)) if row.mask.any() else self.width for row in self.active)
        if free == 0:
            for row in self.active:
                if row.mask.all():
                    row.request.emit(None, "length")
                    row.request.cancelled = True
            self._drop_finished()
            free = min((int(np.argmax(row.mask)) for row in self.active), default=0)
        if free and self.active:
            self.slots.shift(len(self.active), self.width, -free)
            for row in self.active:
                row.mask = row.mask[free:]
            self.width -= free

    def _drop_finished(self) -> None:
        i = 0
        while i < len(self.active):
            if self.active[i].request.cancelled:
                last = len(self.active) - 1
                if i != last:
                    self.slots.move(last, i)
                    self.active[i] = self.active[last]
                self.active.pop()
            else:
                i += 1
        if self.filling is not None and self.filling.index > len(self.active):  # keep it next to the running rows
            self.slots.move(self.filling.index, len(self.active))
            self.filling.index = len(self.active)
