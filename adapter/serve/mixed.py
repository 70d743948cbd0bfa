"""Continuous batching over a paged KV cache: every step is one forward of the running rows'
next tokens together with prompt chunks of the requests joining (mixed prefill and decode).

A row's cache is a list of blocks (``backends/_openvino_paged.PagedSlots``), so a request
joins and leaves with no copy and no re-alignment of the others: the running rows never wait
for a prompt on its own, only for the extra tokens a step carries. ``chunk`` bounds the
prompt tokens per step (split across the joining requests, oldest first; 0: whole prompts),
which bounds the inter-token gap a joining prompt adds (with no row decoding, prompts go in
whole: nobody waits on them); ``budget`` stops adding whole prompts to a step once that many
prompt tokens are in it. Requests, limits, sampling and the queue are
:class:`adapter.serve.continuous.ContinuousBatcher`'s; an engine error in a step ends every
request in that step (they share one forward), and the loop goes on from empty rows.
"""

from __future__ import annotations

__all__ = ["PAGED_CHUNK", "MixedBatcher", "make_batcher"]

import logging
import queue
from dataclasses import dataclass

from adapter.core.errors import AdapterError
from adapter.serve.continuous import Completion, ContinuousBatcher


@dataclass(eq=False)
class _Sequence:
    """A request on row ``row``: ``position`` tokens are in the row's cache (while it fills, the
    first ``position`` of its prompt); ``last`` is the token the next step feeds once it decodes."""

    request: Completion
    row: int
    position: int = 0
    last: int = -1


class MixedBatcher(ContinuousBatcher):
    """The engine thread over paged rows (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fillings: list[_Sequence] = []
        self.free = list(range(self.rows))[::-1]
        self.active: list[_Sequence] = []  # type: ignore[assignment]

    @staticmethod
    def _open(session, rows: int, capacity: int):
        return session.paged_slots(rows, capacity)

    def _busy(self) -> bool:
        return bool(self.active or self.fillings)

    def _filling(self) -> int:
        return len(self.fillings)

    def _admit(self) -> None:
        """Take waiting requests while rows are free; their prompts go in with the next steps."""
        while len(self.active) + len(self.fillings) < self.rows:
            try:
                request = self.waiting.get(timeout=0 if self._busy() else 0.05)
            except queue.Empty:
                break
            if not request.cancelled:
                filling = _Sequence(request, self.free.pop())
                # a prompt that starts with cached blocks (a shared system prompt) computes the rest only
                filling.position = self.slots.reuse(filling.row, request.prompt)
                self.fillings.append(filling)
        self._drop_finished()

    def _step(self) -> None:
        batch = [(s.row, [s.last], s.position) for s in self.active]
        room = (self.chunk or None) if self.active else None  # no row waits: prompts go in whole
        spent = 0
        chunks: list[tuple[_Sequence, int]] = []
        for f in self.fillings:
            if f.request.cancelled:  # its client left: dropped below, its prompt not run
                continue
            if room == 0 or (self.budget and spent >= self.budget and batch):
                break
            prompt = f.request.prompt
            size = len(prompt) - f.position if room is None else min(room, len(prompt) - f.position)
            batch.append((f.row, prompt[f.position : f.position + size], f.position))
            chunks.append((f, size))
            spent += size
            room = None if room is None else room - size
        logits = self.slots.step(batch)
        running = len(self.active)
        for s, row_logits in zip(self.active, logits[:running]):
            s.position += 1
            if not s.request.cancelled:
                self._take(s, row_logits)
        for (f, size), row_logits in zip(chunks, logits[running:]):
            f.position += size
            if f.position == len(f.request.prompt):
                self.fillings.remove(f)
                self.active.append(f)
                self._take(f, row_logits)
        self._drop_finished()

    def _drop_finished(self) -> None:
        for group in (self.active, self.fillings):
            for s in [s for s in group if s.request.cancelled]:
                self.slots.release(s.row)  # blocks back before the row leaves the lists others read
                self.free.append(s.row)
                group.remove(s)

    def _fail(self, reason: str) -> None:
        for s in self.fillings:
            s.request.emit(None, reason)
        for s in self.active + self.fillings:
            self.slots.release(s.row)
            self.free.append(s.row)
        self.fillings = []
        super()._fail(reason)


PAGED_CHUNK = 8
"""Prompt tokens a paged step takes by default. TinyLlama INT4 on OpenVINO, 2 cores, 32 requests
of 32 + 32 tokens (``benchmarks/serve_load.py``, two runs): at 4 and 8 req/s, 8 a step gave
87 and 99-100 tokens/s at inter-token p99 69-72 ms (1.5x one request at a time's 46-53 ms);
16 a step 87-97 and 109-110 tokens/s at 77-94 ms (up to 2.0x); whole prompts 97 and 112 at
93-209 ms. A step of 8 rows costs 44 ms, plus 1.4-1.8 ms per prompt token it carries."""


def make_batcher(session, layout, rows: int = 8, capacity: int = 512, max_queue: int = 64,
                 on_step=lambda active, waiting: None, chunk: int | None = None, budget: int = 0,
                 paged: bool | None = None) -> ContinuousBatcher:  # fmt: skip
    """The batcher for ``session``: paged (mixed steps) where the session has paged rows and
    ``paged`` is not False, else rows that join between decode steps. ``chunk`` None: 8
    prompt tokens a step paged (:data:`PAGED_CHUNK`), whole prompts otherwise."""
    args = (session, layout, rows, capacity, max_queue, on_step)
    if paged or paged is None and hasattr(session, "paged_slots"):
        try:
            return MixedBatcher(*args, PAGED_CHUNK if chunk is None else chunk, budget)
        except AdapterError as exc:
            if paged:
                raise
            # an engine that cannot run paged (built before it, a sliding window): rows join between steps
            logging.getLogger("adapter.serve").warning("Serving without a paged KV cache: %s", exc)
    return ContinuousBatcher(*args, chunk or 0, budget)

