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
from adapter.core.errors import AdapterError
from adapter.runtime.launch import DEFAULT_PORT, check_sharded, is_loopback, run_sharded, torchrun_command


@click.command("launch")
@click.argument("artifact", type=click.Path(path_type=Path))
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
def launch(artifact, nproc, inputs, output, timeout, nnodes, node_rank, master_addr, master_port, as_json):
    """Run a sharded ARTIFACT with torchrun: NPROC processes, gloo on CPUs.

    Every wait between ranks obeys --timeout: a rank that dies or hangs stops the whole run
    with a message naming it and its stage. Prints per-rank wall time, engine and
    communication time, weight bytes and peak memory.

    \b
    Examples:
      adapter launch gpt2-tp2 --nproc 2 --inputs ids.npz --output logits.npz
      adapter launch gpt2-tp2pp2 --nproc 2 --nnodes 2 --master-addr 10.0.0.1
    """
    if timeout <= 0:
        raise click.BadParameter("must be positive", param_hint="--timeout")
    if nnodes > 1:
        _print_commands(artifact, nproc, inputs, output, timeout, nnodes, node_rank, master_addr, master_port)
        return
    result = run_sharded(artifact, nproc, inputs, output, timeout, master_addr, master_port)
    if as_json:
        click.echo(json.dumps({k: v for k, v in result.items() if k != "outputs"}, indent=2))
        return
    _render(result["ranks"], result["outputs"], output, result["seconds"], result["network"])


def _print_commands(artifact, nproc, inputs, output, timeout, nnodes, node_rank, master_addr, master_port) -> None:
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
    if inputs is None:
        raise click.UsageError("A multi-node run needs --inputs (the same .npz path on every node).")
    target = output or Path("outputs.npz")
    click.echo(f"# {manifest['world_size']} ranks: {nnodes} nodes x {nproc} processes. Run on each node, with the "
               f"artifact and the inputs at the same paths; set GLOO_SOCKET_IFNAME to the shared interface.")  # fmt: skip
    for r in range(nnodes) if node_rank is None else [node_rank]:
        cmd = torchrun_command(artifact, nproc, Path(inputs), Path(target), timeout, nnodes=nnodes, node_rank=r,
                               master_addr=master_addr, master_port=master_port or DEFAULT_PORT)  # fmt: skip
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
    shapes = ", ".join(f"{n}: {v.dtype}{list(v.shape)}" for n, v in outputs.items())
    out.print(f"outputs {shapes}" + (f" written to {output}" if output else ""))
    out.print(f"rendezvous network: {network}")
