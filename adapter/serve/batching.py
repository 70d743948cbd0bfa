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
``benchmarks/serve_embed_load.py`` measures the choice. The engine runs in worker threads,
one per stream (``EngineBase.streams``: a batch on each stream at once), so the event loop
keeps accepting (and refusing) requests while batches run; a batch closes only when a
stream is free to run it, so batches grow while every stream is busy. The queue is bounded:
a full queue refuses at once (:class:`Overloaded`) instead of growing.
"""

from __future__ import annotations

__all__ = ["DynamicBatcher", "Overloaded", "BatchStats"]

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from adapter.core.specs import Dim, TensorSpec

MASK = "attention_mask"
Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


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

    def __init__(self, run: Runner | Sequence[Runner], inputs: list[TensorSpec],
                 outputs: list[TensorSpec], max_batch: int = 8, max_wait_ms: float = 0.0, max_queue: int = 64,
                 stats: BatchStats | None = None, bucket: int = 0, limit: int | None = None) -> None:  # fmt: skip
        self.runners = [run] if callable(run) else list(run)  # one per stream, each called from its own thread
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
        self.pool = concurrent.futures.ThreadPoolExecutor(len(self.runners), thread_name_prefix="adapter-engine")
        self.task: asyncio.Task | None = None
        self.running: set[asyncio.Task] = set()
        self.depth = 0

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._serve())

    async def stop(self) -> None:
        """Stop forming batches; the batches running finish and answer their requests."""
        if self.task is not None:
            self.task.cancel()
        await asyncio.gather(*self.running, return_exceptions=True)
        self.pool.shutdown(wait=True)

    async def warm(self, seconds: float) -> tuple[int, int]:
        """Run the shapes batches will take once on every stream (a runtime prepares its
        kernels per shape: MiniLM's first run at a new shape on OpenVINO took 5-20 ms more
        than the next, and a queue waits behind it), cheapest first, for at most ``seconds``;
        ``(shapes warmed, shapes there are)``. Shapes are known where lengths are bucketed or
        fixed: a batch padded to its longest request can take any length, and is not warmed."""
        shapes = self._shapes()
        loop = asyncio.get_running_loop()
        deadline, done = loop.time() + seconds, 0
        for shape in shapes:
            if loop.time() >= deadline:
                break
            feed = {spec.name: (np.ones if spec.name == MASK else np.zeros)(dims, spec.dtype)
                    for spec, dims in zip(self.inputs, shape)}  # fmt: skip
            runs = [loop.run_in_executor(self.pool, run, feed) for run in self.runners]  # the streams at once
            results = await asyncio.gather(*runs, return_exceptions=True)
            if any(isinstance(r, BaseException) for r in results):  # the requests will say why
                break
            done += 1
        return done, len(shapes)

    def _shapes(self) -> list[list[list[int]]]:
        """Every batch shape to come (each input's dims), cheapest first."""
        seq = {dim for axes in self.seq_axes.values() for dim in axes.values()}
        if seq and not self.bucket:
            return []
        lengths = [0]
        if seq:
            low = max(s.shape[a].min for s in self.inputs for a in self.seq_axes[s.name])
            top = min(self.dim_max[dim] for dim in seq)
            lengths = sorted({min(max(k * self.bucket, low), top) for k in range(1, -(-top // self.bucket) + 1)})
        shapes = [self._shape_of(rows, length) for rows in range(1, self.max_batch + 1) for length in lengths]
        return sorted((s for s in shapes if s is not None), key=lambda s: (sum(int(np.prod(d)) for d in s), s))

    def _shape_of(self, rows: int, length: int) -> list[list[int]] | None:
        """Each input's shape for a batch of ``rows`` padded to ``length``; None where an
        input's batch axis does not take ``rows`` (a fixed size, or outside its range)."""
        shapes = []
        for spec in self.inputs:
            first = spec.shape[0] if spec.shape else rows
            if not (first.min <= rows <= first.max if isinstance(first, Dim) else first == rows):
                return None
            shapes.append([length if a in self.seq_axes[spec.name] else (rows if a == 0 and isinstance(d, Dim) else d)
                           for a, d in enumerate(spec.shape)])  # fmt: skip
        return shapes

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
        free: asyncio.Queue[int] = asyncio.Queue()  # the streams with no batch running
        for index in range(len(self.runners)):
            free.put_nowait(index)
        waiting: list[_Item] = []
        while True:
            if not waiting:
                waiting.append(await self.queue.get())
            stream = await free.get()  # requests keep arriving while every stream is busy
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
                free.put_nowait(stream)
                continue
            task = loop.create_task(self._run(stream, live, free))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def _run(self, stream: int, live: list[_Item], free: asyncio.Queue[int]) -> None:
        """One batch on ``stream``; every request of it gets its rows, or the engine's error."""
        started = time.perf_counter()
        try:
            merged, cuts = self._merge(live)
            try:
                outputs = await asyncio.get_running_loop().run_in_executor(self.pool, self.runners[stream], merged)
            finally:
                free.put_nowait(stream)
            answers = [self._cut(outputs, start, stop, item.sizes) for item, (start, stop) in zip(live, cuts)]
        except Exception as exc:
            for item in live:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        self.stats.on_batch(sum(c[1] - c[0] for c in cuts), time.perf_counter() - started)
        for item, answer in zip(live, answers):
            if not item.future.done():
                item.future.set_result(answer)

    def _batchable(self, waiting: list[_Item]) -> list[_Item]:
        """The waiting requests that can share a batch with the first (all when padding)."""
        return [item for item in waiting if item.key == waiting[0].key]

    def _merge(self, items: list[_Item]) -> tuple[dict[str, np.ndarray], list[tuple[int, int]]]:
        longest = {dim: max(item.sizes.get(dim, 0) for item in items) for item in items for dim in item.sizes}
        if self.bucket:  # to the bucket's top: a few shapes recur, so the runtime's kernels for them are reused
            longest = {dim: max(size, min(-(-size // self.bucket) * self.bucket, self.dim_max.get(dim, size)))
                       for dim, size in longest.items()}  # fmt: skip
        rows = [next(iter(item.feed.values())).shape[0] for item in items]
        merged: dict[str, np.ndarray] = {}
        for spec in self.inputs:  # stacked along axis 0, right padding with zeros (masked out), np.pad is slow
            values = [item.feed[spec.name] for item in items]
            shape = [sum(v.shape[0] for v in values), *values[0].shape[1:]]
            for axis, dim in self.seq_axes.get(spec.name, {}).items():
                shape[axis] = longest[dim]
            out = merged[spec.name] = np.zeros(shape, values[0].dtype)
            offset = 0
            for value in values:
                out[(slice(offset, offset + value.shape[0]), *(slice(0, n) for n in value.shape[1:]))] = value
                offset += value.shape[0]
        cuts, offset = [], 0
        for count in rows:
            cuts.append((offset, offset + count))
            offset += count
        return merged, cuts

    def _cut(
        self, outputs: dict[str, np.ndarray], start: int, stop: int, sizes: dict[str, int]
    ) -> dict[str, np.ndarray]:
        result = {}
        for spec in self.outputs:
            value = outputs[spec.name][start:stop]
            for axis, dim in enumerate(spec.shape):
                if axis and isinstance(dim, Dim) and dim.name in sizes:
                    value = value[(slice(None),) * axis + (slice(0, sizes[dim.name]),)]
            result[spec.name] = value
        return result
