"""Dynamic batching for forward-pass engines: a batch closes at ``max_batch`` requests or
``max_wait_ms`` after its oldest request arrived, whichever comes first (a request that already
waited that long behind a running batch goes with the next one at once).

Requests whose inputs have a dynamic sequence axis are **padded** to the longest in the batch
when the engine takes an ``attention_mask`` (padding is masked out: the outputs of each
request equal a run on its own, to float rounding), and the sequence axes of the outputs are
cut back per request; with ``bucket`` N, only requests whose lengths round up to the same
multiple of N share a batch, padded to that multiple (less padding than the longest of any
mix, and few distinct shapes: OpenVINO prepares its kernels per input shape, and MiniLM in
batches of 8 ran 18 ms a batch padded to each batch's longest, 12 ms to multiples of 32). Without a mask, only
requests of identical shapes share a batch, since padding would change their results.
``benchmarks/serve_embed_load.py`` measures the choice. The engine runs in one worker
thread, so the event loop keeps accepting (and refusing) requests while a batch runs; the
queue is bounded: a full queue refuses at once (:class:`Overloaded`) instead of growing.
"""

from __future__ import annotations

__all__ = ["DynamicBatcher", "Overloaded", "BatchStats"]

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from adapter.core.specs import Dim, TensorSpec

MASK = "attention_mask"


class Overloaded(Exception):
    """The queue is full: the request is refused, not queued."""


@dataclass
class BatchStats:
    """Hooks the server's metrics listen to."""

    on_batch: Callable[[int, float], None] = lambda size, seconds: None
    on_queue: Callable[[int], None] = lambda depth: None


@dataclass(eq=False)
class _Item:
    feed: dict[str, np.ndarray]
    future: asyncio.Future
    key: tuple = ()
    sizes: dict[str, int] = field(default_factory=dict)
    arrived: float = 0.0


class DynamicBatcher:
    """Batches the requests of one engine (see the module docstring)."""

    def __init__(self, run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], inputs: list[TensorSpec],
                 outputs: list[TensorSpec], max_batch: int = 8, max_wait_ms: float = 5.0, max_queue: int = 64,
                 stats: BatchStats | None = None, bucket: int = 0, limit: int | None = None) -> None:  # fmt: skip
        self.run = run
        self.inputs, self.outputs = inputs, outputs
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1e3, max_queue
        self.stats = stats or BatchStats()
        self.pad = any(s.name == MASK for s in inputs)
        self.bucket = bucket if self.pad else 0
        self.batch_dim = {s.name: s.shape[0].name for s in inputs + outputs if s.shape and isinstance(s.shape[0], Dim)}
        # the dynamic non-batch axes of the inputs, by dim name: what padding (or bucketing) is about
        self.seq_axes = {s.name: {a: d.name for a, d in enumerate(s.shape) if a and isinstance(d, Dim)}
                         for s in inputs}  # fmt: skip
        # how far a bucket may pad a sequence axis: its declared range, and the model's own limit
        # where the caller knows it (the tokenizer's length: BERT's 512 positions under a 4096 range)
        self.dim_max = {d.name: min(d.max, limit or d.max) for s in inputs for a, d in enumerate(s.shape)
                        if a and isinstance(d, Dim)}  # fmt: skip
        self.queue: asyncio.Queue[_Item] | None = None
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-engine")
        self.task: asyncio.Task | None = None
        self.depth = 0

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._serve())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.pool.shutdown(wait=True)

    async def submit(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request (batch axis of size 1 or more); its outputs once its batch has run.

        Raises:
            Overloaded: ``max_queue`` requests already wait.
        """
        if self.depth >= self.max_queue:
            raise Overloaded(f"{self.depth} requests are already waiting (the limit is {self.max_queue}).")
        sizes = {dim: feed[name].shape[axis] for name, axes in self.seq_axes.items() if name in feed
                 for axis, dim in axes.items()}  # fmt: skip
        if self.bucket:  # lengths rounded up to the bucket: only requests of one bucket share a batch
            key = tuple(sorted((dim, -(-size // self.bucket)) for dim, size in sizes.items()))
        else:
            key = () if self.pad else tuple(sorted(sizes.items()))
        loop = asyncio.get_running_loop()
        item = _Item(feed, loop.create_future(), key, sizes, loop.time())
        self.depth += 1
        self.stats.on_queue(self.depth)
        await self.queue.put(item)
        return await item.future

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        waiting: list[_Item] = []
        while True:
            if not waiting:
                waiting.append(await self.queue.get())
            while True:  # the oldest request waits at most max_wait, counted from its arrival
                while not self.queue.empty():
                    waiting.append(self.queue.get_nowait())
                timeout = waiting[0].arrived + self.max_wait - loop.time()
                if len(self._batchable(waiting)) >= self.max_batch or timeout <= 0:
                    break
                try:
                    waiting.append(await asyncio.wait_for(self.queue.get(), timeout))
                except TimeoutError:
                    break
            batch = self._batchable(waiting)[: self.max_batch]
            taken = {id(item) for item in batch}
            waiting = [item for item in waiting if id(item) not in taken]
            self.depth -= len(batch)
            self.stats.on_queue(self.depth)
            live = [item for item in batch if not item.future.cancelled()]
            if not live:
                continue
            started = time.perf_counter()
            try:
                merged, cuts = self._merge(live)
                outputs = await loop.run_in_executor(self.pool, self.run, merged)
            except Exception as exc:  # every request of the batch gets the engine's error
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            self.stats.on_batch(sum(c[1] - c[0] for c in cuts), time.perf_counter() - started)
            for item, (start, stop) in zip(live, cuts):
                if not item.future.done():
                    item.future.set_result(self._cut(outputs, start, stop, item.sizes))

    def _batchable(self, waiting: list[_Item]) -> list[_Item]:
        """The waiting requests that can share a batch with the first (all when padding)."""
        return [item for item in waiting if item.key == waiting[0].key]

    def _merge(self, items: list[_Item]) -> tuple[dict[str, np.ndarray], list[tuple[int, int]]]:
        longest = {dim: max(item.sizes.get(dim, 0) for item in items) for item in items for dim in item.sizes}
        if self.bucket:  # to the bucket's top: a few shapes recur, so the runtime's kernels for them are reused
            longest = {dim: max(size, min(-(-size // self.bucket) * self.bucket, self.dim_max.get(dim, size)))
                       for dim, size in longest.items()}  # fmt: skip
        merged: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            parts = []
            for item in items:
                value = item.feed[spec.name]
                pads = [(0, 0)] * value.ndim
                for axis, dim in self.seq_axes.get(spec.name, {}).items():
                    pads[axis] = (0, longest[dim] - value.shape[axis])  # right padding, masked out
                parts.append(np.pad(value, pads) if any(p[1] for p in pads) else value)
            merged[spec.name] = np.concatenate(parts, axis=0)
        cuts, offset = [], 0
        for item in items:
            rows = next(iter(item.feed.values())).shape[0]
            cuts.append((offset, offset + rows))
            offset += rows
        return merged, cuts

    def _cut(
        self, outputs: dict[str, np.ndarray], start: int, stop: int, sizes: dict[str, int]
    ) -> dict[str, np.ndarray]:
        result = {}
        for spec in self.outputs:
            value = outputs[spec.name][start:stop]
            for axis, dim in enumerate(spec.shape):
                if axis and isinstance(dim, Dim) and dim.name in sizes:
                    value = np.take(value, np.arange(sizes[dim.name]), axis=axis)
            result[spec.name] = value
        return result
