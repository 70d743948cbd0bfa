"""One rank of a served sharded decoder, started by ``torchrun`` (``adapter serve SHARDED_ARTIFACT`` does it).

``python -m adapter.llm.rank_serve ARTIFACT --request request.json --output result.json``

The front end (:mod:`adapter.serve.sharded`) runs the HTTP server and the continuous batcher.
Its slot calls — prefill a prompt, decode the running rows, move a row — come to rank 0 over a
unix socket (``request["socket"]``; a path, so it reaches a launcher in a network namespace of
its own). Rank 0 broadcasts each call to every rank (:mod:`adapter.runtime.frames`), every rank
applies it to its :class:`RankSlots` (its stage's cache, only its KV heads under tensor
parallelism) through the same segments and collectives as ``adapter launch ... generate``, and
rank 0 answers with the logits. With no call for ``heartbeat`` seconds rank 0 broadcasts a
no-op, so no rank's wait runs into ``--timeout`` while the server idles. The socket closing
(or a ``stop`` call) ends every rank; rank 0 writes how many calls ran.
"""

from __future__ import annotations

__all__ = ["RankSlots", "main"]

import argparse
import json
import select
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np

from adapter.backends._state_slots import StateSlots, gather_rows
from adapter.core.errors import InputMismatchError
from adapter.llm.layout import DecoderLayout
from adapter.llm.rank_generate import RankSession, rank0_writer
from adapter.runtime.frames import pack, recv_frame, send_frame, unpack
from adapter.runtime.worker import Job, add_common_arguments, run_rank


class RankSlots(StateSlots):
    """Continuous-batching rows over one rank's stage: the running rows' cache and the filling
    prompt's are this rank's arrays (``_state_slots.StateSlots`` keeps the rows' bookkeeping)."""

    def __init__(self, session: RankSession, slots: int, capacity: int) -> None:
        super().__init__(slots, capacity)
        self.session = session
        self.main: dict[str, np.ndarray] = {}
        self.fill: dict[str, np.ndarray] = {}

    def _prefill(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, fresh: bool) -> np.ndarray:
        if fresh:
            self.fill = self.session.empty_cache(1)
        logits, self.fill = self.session.forward(ids, mask, positions, self.fill)
        return logits[:, -1]

    def _read_fill(self) -> dict[str, np.ndarray]:
        return self.fill

    def _read_main(self) -> dict[str, np.ndarray]:
        return self.main

    def _write_main(self, state: dict[str, np.ndarray]) -> None:
        self.main = state

    def _decode(self, tokens: np.ndarray, masks: np.ndarray, positions: np.ndarray, beam: list[int]) -> np.ndarray:
        logits, self.main = self.session.forward(tokens, masks, positions, gather_rows(self.main, beam))
        return logits[:, -1]


def _apply(slots: RankSlots, header: dict[str, Any], arrays: list[np.ndarray]) -> np.ndarray | None:
    op = header["op"]
    if op == "prefill":
        return slots.prefill(int(header["row"]), arrays[0], arrays[1], int(header["start"]))[None]
    if op == "decode":
        return slots.decode(arrays[0], arrays[1], arrays[2])
    if op == "move":
        slots.move(int(header["source"]), int(header["target"]))
    return None


def _next_call(rank, conn: socket.socket | None, heartbeat: float) -> bytes:
    """Rank 0: the front end's next call (a no-op after ``heartbeat`` s of silence, ``stop`` when
    the socket closed), broadcast; the other ranks: what rank 0 broadcast."""
    if rank.rank == 0:
        ready, _, _ = select.select([conn], [], [], heartbeat)
        data = (recv_frame(conn) or pack({"op": "stop"})) if ready else pack({"op": "noop"})
        rank.broadcast(np.array([len(data)], np.int64), 0, "the next call's size")
        rank.broadcast(np.frombuffer(data, np.uint8).copy(), 0, "the next call")
        return data
    size = int(rank.broadcast(np.zeros(1, np.int64), 0, "the next call's size")[0])
    return rank.broadcast(np.zeros(size, np.uint8), 0, "the next call").tobytes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapter.llm.rank_serve", description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--request", type=Path, required=True, help="The serving settings (JSON).")
    parser.add_argument("--output", type=Path, required=True, help="Where rank 0 writes its call count (JSON).")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    layout: list[DecoderLayout] = []

    def prepare(manifest: dict[str, Any]) -> dict[str, Any]:
        if manifest.get("task") != "text-generation":
            raise InputMismatchError("This sharded artifact is no generation engine; run it with `adapter launch`.")
        layout.append(DecoderLayout.from_json(manifest["layout"]))
        return json.loads(args.request.read_text())

    def run(rank, request: dict[str, Any]) -> dict[str, Any]:
        slots = RankSlots(RankSession(rank, layout[0]), int(request["rows"]), int(request["capacity"]))
        heartbeat = min(float(request.get("heartbeat", 10.0)), args.timeout / 4)
        conn = None
        if rank.rank == 0:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(request["socket"])
        calls = 0
        while True:
            header, arrays = unpack(_next_call(rank, conn, heartbeat))
            if header["op"] == "stop":
                break
            logits = _apply(slots, header, arrays)
            if logits is not None and conn is not None:
                send_frame(conn, pack({"op": header["op"]}, [logits]))
            calls += header["op"] != "noop"
        if conn is not None:
            conn.close()
        return {"calls": calls, "joins": slots.joins}

    run_rank(args, Job(prepare, run, rank0_writer(args.output)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
