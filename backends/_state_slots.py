"""Continuous batching over a decoder whose running rows share one cache "state" that grows
by a position per step (OpenVINO's stateful infer request; a sharded rank's concatenated
cache), as opposed to ONNX Runtime's fixed buffer (``_ort_decoder.OrtSlots``).

The state holds the running rows right-aligned on a common width (left padding masked).
A prompt is prefilled on its own cache (a second infer request, or its own arrays) and joins
at the next decode step: the running state and the prompt's cache are read, aligned on the
step's mask width (left padding added, or the padding all rows share cut off) and written
back as the new running state. Rows leave and change places by a gather of the state's rows
at the step (``beam``): no copy where the backend gathers inside the step. ``shift`` and
``shift_row`` move nothing: the alignment follows from the widths of the next step's masks.
The slot calls are those of :class:`adapter.serve.continuous.ContinuousBatcher`.
"""

from __future__ import annotations

__all__ = ["StateSlots"]

from abc import ABC, abstractmethod
from typing import Any

import numpy as np


class _Filled:
    """A prompt prefilled on its own cache, not yet in the running state."""

    arrays: dict[str, np.ndarray] | None = None
    """Its cache, read out once another prompt needed the filling cache (else still there)."""


class StateSlots(ABC):
    """The row bookkeeping (see the module docstring); a backend fills in the hooks below."""

    fixed_batch = False
    """True when a step must keep the state's row count (OpenVINO: the graph's shapes read the
    state's own batch). Rows that left are then stepped as copies of row 0 until the next
    rebuild drops them (a rebuild happens anyway when more than half the rows are dead)."""

    def __init__(self, slots: int, capacity: int) -> None:
        self.slots, self.capacity = slots, capacity
        self.rows: list[int | _Filled] = []
        """Where each row's cache is: a row of the running state, or a prefilled prompt."""
        self.width = self.batch = 0
        """Positions and rows in the running state."""
        self.live: _Filled | None = None
        self.joins = 0

    # -- the backend's hooks (abstract)

    @abstractmethod
    def _prefill(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, fresh: bool) -> np.ndarray:
        """One chunk on the filling cache (emptied first when ``fresh``); last logits (1, vocab)."""

    @abstractmethod
    def _read_fill(self) -> dict[str, np.ndarray]:
        """The filling prompt's cache, by state name (1 row)."""

    @abstractmethod
    def _read_main(self) -> dict[str, np.ndarray]:
        """The running state, by state name."""

    @abstractmethod
    def _write_main(self, state: dict[str, np.ndarray]) -> None:
        """Make ``state`` the running state."""

    @abstractmethod
    def _decode(self, tokens: np.ndarray, masks: np.ndarray, positions: np.ndarray, beam: list[int]) -> np.ndarray:
        """A step of the running state with its rows gathered by ``beam``; last logits (rows, vocab)."""

    # -- the batcher's calls

    def _place(self, row: int, source: int | _Filled) -> None:
        self.rows.extend([-1] * (row + 1 - len(self.rows)))
        self.rows[row] = source

    def prefill(self, row: int, prompt: np.ndarray, mask: np.ndarray, start: int = 0) -> np.ndarray:
        """Prefill ``prompt`` (its tokens from position ``start`` on) on the filling cache; the
        row joins the running state at the next decode. Its last logits (vocab,)."""
        fresh = start == 0
        if fresh:
            if self.live is not None and any(source is self.live for source in self.rows):
                self.live.arrays = self._read_fill()  # admitted, not yet joined: keep its cache
            self.live = _Filled()
        end = start + len(prompt)
        positions = np.arange(start, end, dtype=np.int64)[None]
        logits = self._prefill(np.asarray(prompt, np.int64)[None], np.ones((1, end), np.int64), positions, fresh)
        self._place(row, self.live)
        return logits[0]

    def shift_row(self, row: int, start: int, length: int, by: int) -> None:  # noqa: B027 (a no-op on purpose)
        """Nothing to move: a filling prompt's cache is its own until it joins."""

    def shift(self, rows: int, width: int, by: int) -> None:  # noqa: B027 (a no-op on purpose)
        """Nothing to move now: the next step's mask width gives the new alignment."""

    def move(self, source: int, target: int) -> None:
        if source < len(self.rows):
            self._place(target, self.rows[source])

    def _rebuild(self, sources: list[int | _Filled], width: int) -> None:
        """Write the running state as ``sources``' caches, right-aligned on ``width`` positions."""
        main = self._read_main() if any(isinstance(s, int) for s in sources) else {}
        live = self._read_fill() if any(s is self.live for s in sources) else {}
        merged_state: dict[str, np.ndarray] = {}
        for name in (main or live or sources[0].arrays).keys():
            parts = [main[name][s] if isinstance(s, int) else (s.arrays or live)[name][0] for s in sources]
            heads, _, dim = parts[0].shape
            merged = np.zeros((len(parts), heads, width, dim), parts[0].dtype)
            for i, part in enumerate(parts):
                keep = min(width, part.shape[1])
                merged[i, :, width - keep :] = part[:, part.shape[1] - keep :]
            merged_state[name] = merged
        self._write_main(merged_state)
        self.joins += 1

    def decode(self, tokens: np.ndarray, masks: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One token for each of the first ``len(tokens)`` rows; their logits (rows, vocab)."""
        n, width = len(tokens), masks.shape[1] - 1
        sources = self.rows[:n]
        tokens = np.asarray(tokens, np.int64).reshape(n, 1)
        positions = np.asarray(positions, np.int64).reshape(n, 1)
        dead = self.batch - n
        if width == self.width and all(isinstance(s, int) for s in sources) and (not self.fixed_batch or 0 <= dead <= n):
            beam = list(sources)
            if self.fixed_batch and dead:  # rows that left: stepped as copies of row 0
                beam += [sources[0]] * dead
                tokens, positions = np.pad(tokens, ((0, dead), (0, 0))), np.pad(positions, ((0, dead), (0, 0)))
                masks = np.concatenate([masks, np.repeat(masks[:1], dead, axis=0)])
        else:
            self._rebuild(sources, width)
            beam = list(range(n))
        logits = self._decode(tokens, masks, positions, beam)[:n]
        self.rows, self.width, self.batch = list(range(n)), width + 1, len(beam)
        return logits

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rows={self.slots}, running={self.batch}, width={self.width})"


def gather_rows(state: dict[str, Any], beam: list[int]) -> dict[str, Any]:
    """``state``'s rows in ``beam``'s order (the arrays themselves when nothing changes)."""
    first = next(iter(state.values()), None)
    if first is not None and beam == list(range(len(first))):
        return state
    return {name: array[beam] for name, array in state.items()}
