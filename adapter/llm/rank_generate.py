"""One rank of a sharded generation, started by ``torchrun`` (``adapter launch ... generate`` does it).

``python -m adapter.llm.rank_generate ARTIFACT --request request.json --output result.json``

Every rank runs the same generation loop (:func:`adapter.llm.generate.generate`) over a
:class:`RankSession`: a step feeds the ids, mask and positions to the rank's stage (every stage
gets them), stage *s* > 0 first receives the hidden state from stage *s* - 1, the rank's
segments and collectives run (:class:`adapter.runtime.worker._Rank`), each stage keeps the
presents of its own layers as its cache (only its KV heads under tensor parallelism), and the
last stage's logits at the last position are broadcast from its tensor-parallel rank 0 to
every rank. So every rank picks the same next token (the sampler is seeded alike); rank 0
prints each step's tokens (``adapter-token {json}``) when asked to stream and writes the
result (tokens, time to first token, decode tokens/s) after the final barrier. Waits, faults
and reports are the forward-pass worker's (:mod:`adapter.runtime.worker`): a dead or hung rank
ends every rank within ``--timeout`` with a message naming it; the fault hook's ``mb=K`` is
the generation step.
"""

from __future__ import annotations

__all__ = ["RankSession", "main", "rank0_writer"]

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from adapter.core.errors import InputMismatchError
from adapter.llm.generate import Sampling, generate
from adapter.llm.layout import DecoderLayout
from adapter.runtime.worker import Job, RankFailure, add_common_arguments, run_rank

TOKEN_MARK = "adapter-token "


class RankSession:
    """A decoder session over one rank's stage of a sharded decoder (see the module docstring)."""

    def __init__(self, rank: Any, layout: DecoderLayout) -> None:
        self.rank = rank
        self.layout = layout
        manifest = rank.manifest
        self.tp = int(manifest.get("tp", 1))
        self.writer = (int(manifest.get("pp", 1)) - 1) * self.tp  # the last stage's tensor-parallel rank 0
        pasts = {p: i for i, p in enumerate(layout.past_names())}
        self.heads: dict[str, int] = {}
        for engine in rank.engines:
            for spec in engine.inputs if engine is not None else []:
                if spec.name in pasts:
                    self.heads[spec.name] = int(spec.shape[1])
        self.presents = {p: layout.present_names()[pasts[p]] for p in self.heads}
        self.cache: dict[str, np.ndarray] = {}
        self.count = 0

    def start(self, batch: int, capacity: int) -> None:
        self.cache = self.empty_cache(batch)

    def step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, last_only: bool = True) -> np.ndarray:
        """Each row's last-position logits (batch, 1, vocab), whatever ``last_only`` says: only they
        are broadcast from the last stage (the generation loop asks for no more)."""
        logits, self.cache = self.forward(ids, mask, positions, self.cache)
        return logits

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        return {name: np.zeros((batch, heads, 0, self.layout.head_dim), np.float32) for name, heads in self.heads.items()}

    def forward(
        self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One step of this rank's stage over ``cache`` (its past inputs): the last-position
        logits of every row (batch, 1, vocab) on every rank, and the stage's presents."""
        rank, k = self.rank, self.count
        self.count += 1
        rank.microbatches = self.count  # the report's count: generation steps
        env: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        env.update(cache)
        if rank.spec.get("recv_from") is not None:
            env.update(rank.recv(k))
        env = rank.run_microbatch(env, k)
        if rank.spec.get("send_to") is not None:
            rank._finish_send(k, rank.send(env, k))
        presents = {past: env[present] for past, present in self.presents.items()}
        shape = (ids.shape[0], 1, self.layout.vocab_size)
        if rank.rank == self.writer:
            logits = np.ascontiguousarray(env["logits"][:, -1:, :], dtype=np.float32)
        else:
            logits = np.zeros(shape, np.float32)
        return rank.broadcast(logits, self.writer, f"the logits of step {k}").reshape(shape), presents


def rank0_writer(output: Path):
    """A job's ``write``: rank 0 writes the result as JSON to ``output`` atomically."""

    def write(rank, data: dict[str, Any]) -> None:
        if rank.rank != 0:
            return
        fd, tmp = tempfile.mkstemp(prefix=".result.", dir=Path(output).parent)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
        os.replace(tmp, output)

    return write


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m adapter.llm.rank_generate", description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--request", type=Path, required=True, help="The generation request (JSON).")
    parser.add_argument("--output", type=Path, required=True, help="Where rank 0 writes the result (JSON).")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def _request(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    try:
        request = json.loads(Path(path).read_text())
        prompts = [[int(t) for t in p] for p in request["prompts"]]
        int(request["max_new_tokens"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputMismatchError(f"Cannot read the generation request '{path}': {exc}.") from exc
    if manifest.get("task") != "text-generation":
        raise InputMismatchError("This sharded artifact is no generation engine; run it with `adapter launch`.")
    return {**request, "prompts": prompts}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    layout: list[DecoderLayout] = []

    def prepare(manifest: dict[str, Any]) -> dict[str, Any]:
        layout.append(DecoderLayout.from_json(manifest["layout"]))
        return _request(args.request, manifest)

    def run(rank, request: dict[str, Any]) -> dict[str, Any]:
        session = RankSession(rank, layout[0])
        stream = rank.rank == 0 and request.get("stream")

        def on_tokens(step: int, tokens: list[int]) -> None:
            sys.stdout.write(TOKEN_MARK + json.dumps({"step": step, "tokens": tokens}) + "\n")
            sys.stdout.flush()

        first: list[np.ndarray] = []
        step = session.step

        def keep_first(*a, **kw):
            out = step(*a, **kw)
            if not first:
                first.append(out[:, -1, :].copy())
            return out

        session.step = keep_first
        sampling = Sampling(**request.get("sampling", {}))
        try:
            result = generate(session, layout[0], request["prompts"], int(request["max_new_tokens"]), sampling,
                              bool(request.get("stop_at_eos", True)), on_tokens if stream else None)  # fmt: skip
        except InputMismatchError as exc:
            raise RankFailure(f"{rank.label}: {exc}", "error") from exc
        data = result.to_json()
        if request.get("first_logits"):
            data["first_logits"] = first[0].tolist()
        return data

    run_rank(args, Job(prepare, run, rank0_writer(args.output)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
