"""``adapter launch``: run a sharded artifact under torchrun (:mod:`adapter.runtime.launch`) and print its ranks.

Registered on the main CLI with ``cli.add_command(launch)``; errors are
:class:`adapter.core.errors.AdapterError` and reach ``adapter.cli.main.main``, which prints them
as one paragraph.
"""

from __future__ import annotations

__all__ = ["launch"]

import json
import shlex
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.table import Table

from adapter.cli.console import out
from adapter.cli.generate import parse_ids
from adapter.core.errors import AdapterError
from adapter.llm.generate import Sampling
from adapter.llm.sharded import WORKER, generate_sharded, generation_request
from adapter.runtime.launch import DEFAULT_PORT, check_sharded, is_loopback, run_sharded, torchrun_command


@click.command("launch")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("mode", type=click.Choice(["run", "generate"]), default="run", required=False)
@click.option("--nproc", type=int, required=True, help="Processes on this node (ranks per node).")
@click.option("--inputs", type=click.Path(path_type=Path), default=None, help="Model inputs (.npz); default: random.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Write the outputs here (.npz).")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds any rank may wait for another before the whole run is stopped.")  # fmt: skip
@click.option("--nnodes", type=int, default=1, show_default=True, help="Nodes; above 1, print each node's command.")
@click.option("--node-rank", type=int, default=None, help="With --nnodes: print only this node's command.")
@click.option("--master-addr", default="127.0.0.1", show_default=True,
              help="Rendezvous address (unauthenticated: loopback unless the nodes need a shared network).")  # fmt: skip
@click.option("--master-port", type=int, default=None, help="Rendezvous port; default: a free one (29500 multi-node).")
@click.option("--json", "as_json", is_flag=True, help="Print the per-rank reports as JSON.")
@click.option("--prompt-ids", "prompt_ids", multiple=True, help="generate: prompt token ids, e.g. 1,2,3 (repeatable).")
@click.option("--max-new-tokens", type=click.IntRange(1), default=32, show_default=True, help="generate: new tokens.")
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="generate: 0 is greedy.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="generate: 0 is no cut.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="generate: sampling seed (every rank samples alike).")
@click.option("--stream", is_flag=True, help="generate: print rank 0's tokens as they come.")
@click.option("--ignore-eos", is_flag=True, help="generate: go on past end-of-sequence.")
def launch(artifact, mode, nproc, inputs, output, timeout, nnodes, node_rank, master_addr, master_port, as_json,
           prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stream, ignore_eos):  # fmt: skip
    """Run a sharded ARTIFACT with torchrun: NPROC processes, gloo on CPUs.

    MODE is run (a forward pass over --inputs) or generate (a sharded decoder from `adapter
    shard` of a causal LM: every rank runs the same loop, the last stage's logits are broadcast
    each step, rank 0 streams the tokens).

    Every wait between ranks obeys --timeout: a rank that dies or hangs stops the whole run
    with a message naming it and its stage. Prints per-rank wall time, engine and
    communication time, weight bytes and peak memory.

    \b
    Examples:
      adapter launch gpt2-tp2 --nproc 2 --inputs ids.npz --output logits.npz
      adapter launch gpt2-tp2pp2 --nproc 2 --nnodes 2 --master-addr 10.0.0.1
      adapter launch qwen2-tp2pp2 --nproc 4 generate --prompt-ids 1,2,3 --max-new-tokens 32 --stream
    """
    if timeout <= 0:
        raise click.BadParameter("must be positive", param_hint="--timeout")
    if mode == "generate":
        if not prompt_ids:
            raise click.UsageError("generate needs --prompt-ids (one or more).")
        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        if nnodes > 1:
            request = generation_request([parse_ids(p) for p in prompt_ids], max_new_tokens, sampling,
                                         not ignore_eos, stream)  # fmt: skip
            _print_commands(artifact, nproc, inputs, output, timeout, nnodes, node_rank, master_addr, master_port,
                            request)  # fmt: skip
            return
        _generate(artifact, nproc, timeout, as_json, [parse_ids(p) for p in prompt_ids], max_new_tokens, sampling,
                  stream, ignore_eos)  # fmt: skip
        return
    if nnodes > 1:
        _print_commands(artifact, nproc, inputs, output, timeout, nnodes, node_rank, master_addr, master_port)
        return
    result = run_sharded(artifact, nproc, inputs, output, timeout, master_addr, master_port)
    if as_json:
        click.echo(json.dumps({k: v for k, v in result.items() if k != "outputs"}, indent=2))
        return
    _render(result["ranks"], result["outputs"], output, result["seconds"], result["network"])


def _print_commands(artifact, nproc, inputs, output, timeout, nnodes, node_rank, master_addr, master_port,
                    request=None) -> None:  # fmt: skip
    artifact = Path(artifact).resolve()
    manifest = check_sharded(artifact, nproc, nnodes)
    if is_loopback(master_addr):
        raise AdapterError(
            f"A {nnodes}-node run needs the rendezvous on an address the other nodes reach, not '{master_addr}'.",
            "Give --master-addr: node 0's address on the network the nodes share (the rendezvous has no "
            "authentication, so keep that network private).",
        )
    if node_rank is not None and not 0 <= node_rank < nnodes:
        raise click.BadParameter(f"must be in 0..{nnodes - 1}", param_hint="--node-rank")
    worker = ("adapter.runtime.worker", "--inputs")
    if request is not None:  # generation: the request goes to a JSON file each node reads at the same path
        inputs = Path(inputs or "request.json")
        click.echo(f"# write this request to {inputs} on every node:\n{json.dumps(request)}")
        worker = (WORKER, "--request")
    elif inputs is None:
        raise click.UsageError("A multi-node run needs --inputs (the same .npz path on every node).")
    target = output or Path("result.json" if request is not None else "outputs.npz")
    click.echo(f"# {manifest['world_size']} ranks: {nnodes} nodes x {nproc} processes. Run on each node, with the "
               f"artifact and the inputs at the same paths; set GLOO_SOCKET_IFNAME to the shared interface.")  # fmt: skip
    for r in range(nnodes) if node_rank is None else [node_rank]:
        cmd = torchrun_command(artifact, nproc, Path(inputs), Path(target), timeout, nnodes=nnodes, node_rank=r,
                               master_addr=master_addr, master_port=master_port or DEFAULT_PORT,
                               worker=worker)  # fmt: skip
        cmd[:3] = ["torchrun"]
        click.echo(f"# node {r}\n{shlex.join(cmd)}")


def _render(reports: list[dict[str, Any]], outputs: dict[str, np.ndarray], output: Path | None, elapsed: float,
            network: str):  # fmt: skip
    table = Table(title=f"Ranks ({elapsed:.1f} s from launch to exit)", title_justify="left")
    for column in ("rank", "stage", "tp", "microbatches", "wall s", "load s", "engine s", "comm s", "weights MB",
                   "peak RSS MB"):  # fmt: skip
        table.add_column(column, justify="right")
    for r in reports:
        weights = "" if r.get("weights_bytes") is None else f"{r['weights_bytes'] / 1e6:.2f}"
        table.add_row(str(r["rank"]), str(r["stage"]), str(r["tp_rank"]), str(r["microbatches"]), f"{r['wall_s']:.3f}",
                      f"{r['load_s']:.3f}", f"{r['engine_s']:.3f}", f"{r['comm_s']:.3f}", weights,
                      f"{r['peak_rss_bytes'] / 1e6:.0f}")  # fmt: skip
    out.print(table)
    if outputs:
        shapes = ", ".join(f"{n}: {v.dtype}{list(v.shape)}" for n, v in outputs.items())
        out.print(f"outputs {shapes}" + (f" written to {output}" if output else ""))
    out.print(f"rendezvous network: {network}")


def _generate(artifact, nproc, timeout, as_json, prompts, max_new_tokens, sampling, stream, ignore_eos) -> None:
    def show(_step: int, tokens: list[int]) -> None:
        click.echo(" ".join(str(t) for t in tokens), nl=len(tokens) > 1 or not stream)
        if len(tokens) == 1:
            click.echo(" ", nl=False)

    ran = generate_sharded(artifact, nproc, prompts, max_new_tokens, sampling, not ignore_eos, timeout,
                           show if stream and not as_json else None)  # fmt: skip
    result = ran["generation"]
    if as_json:
        click.echo(json.dumps({**result, "ranks": ran["ranks"], "seconds": ran["seconds"]}, indent=2))
        return
    if stream:
        click.echo()
    for row, tokens in enumerate(result["tokens"]):
        out.print(f"[{row}] {' '.join(str(t) for t in tokens)}  ({result['finished'][row]})")
    out.print(
        f"time to first token {result['time_to_first_token_ms']:.1f} ms, decode "
        f"{result['decode_tokens_per_s']:.1f} tokens/s over {len(ran['ranks'])} ranks ({ran['seconds']:.1f} s from "
        f"launch to exit)"
    )
    _render(ran["ranks"], {}, None, ran["seconds"], ran["network"])
