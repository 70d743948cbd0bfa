"""``adapter plan``: choose tensor- and pipeline-parallel degrees for a cluster and print why.

Registered on the main CLI with ``cli.add_command(plan)``; errors are
:class:`adapter.core.errors.AdapterError` and reach ``adapter.cli.main.main``, which prints them as
one paragraph.
"""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from adapter.converter.importer import import_source
from adapter.passes.pipeline import build_pipeline, run_pipeline
from adapter.passes.sharding_plan import parse_cluster, plan_sharding

__all__ = ["plan", "render_plan"]

_WIDTH = None if sys.stdout.isatty() else 160


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render_plan(console: Console, data: dict) -> None:
    """Print a plan (the JSON of :class:`adapter.passes.sharding_plan.ShardingPlan`)."""
    facts, assume, est = data["model"], data["assumptions"], data["estimate"]
    console.print(
        f"[bold]{escape(data['cluster'])}[/]: {data['devices']} x {escape(data['profile'])}, "
        f"{escape(assume['interconnect'])} {assume['interconnect_bandwidth'] / 1e9:.0f} GB/s per direction, "
        f"alpha {assume['alpha_s'] * 1e6:.0f} us; {data['precision']} peak {assume['peak_flops'] / 1e12:.2f} TFLOP/s"
        + (" per rank (ranks share this machine)" if assume["shared_host"] else ""),
        highlight=False,
    )
    console.print(
        f"model: {facts['layers']} blocks ({escape(' .. '.join(facts['layer_paths']))}), {facts['heads']} heads "
        f"({facts['heads_source']}), hidden {facts['hidden']}, vocabulary {facts['vocab'] or '-'}, "
        f"weights {facts['weight_bytes'] / 2**20:.1f} MiB; batch {data['batch']}, seq {data['seq']}",
        highlight=False,
    )
    console.print(
        f"[bold green]plan: tp={data['tp']} pp={data['pp']}[/], {data['microbatches']} microbatch"
        f"{'es' if data['microbatches'] > 1 else ''} of {data['microbatch_size']}, "
        f"estimated {est['total_ms']:.3f} ms per batch (compute {est['compute_ms']:.3f}, "
        f"tensor-parallel comm {est['tp_comm_ms']:.3f}, pipeline comm {est['pp_comm_ms']:.3f}, "
        f"bubble {est['bubble']:.0%}), {_gib(data['memory_per_rank'])} GiB per rank "
        f"of {_gib(assume['memory_size'])}",
        highlight=False,
    )
    stages = Table(title="Stages of the plan", title_justify="left")
    for col in ("stage", "blocks", "embedding", "head", "GFLOP/microbatch", "step ms", "weights GiB", "act GiB", "GiB"):
        stages.add_column(col, justify="left" if col == "blocks" else "right")
    for st in data["stages"]:
        start, stop = st["layers"]
        stages.add_row(
            str(st["index"]),
            f"{start}..{stop - 1} ({escape(st['first_layer'])} .. {escape(st['last_layer'])})",
            "yes" if st["embedding"] else "",
            "yes" if st["head"] else "",
            f"{st['flops'] / 1e9:.2f}",
            _ms(st["step_ms"]),
            _gib(st["weight_bytes"]),
            _gib(st["activation_bytes"]),
            _gib(st["memory_bytes"]),
        )
    console.print(stages)
    table = Table(title="Candidates (tp x pp = devices)", title_justify="left")
    for col in ("tp", "pp", "m", "GiB/rank", "fits", "compute ms", "tp comm ms", "pp comm ms", "total ms", "note"):
        table.add_column(col, justify="left" if col == "note" else "right")
    for c in data["candidates"]:
        chosen = (c["tp"], c["pp"]) == (data["tp"], data["pp"])
        note = "chosen" if chosen else c["reason"] or ""
        table.add_row(
            str(c["tp"]),
            str(c["pp"]),
            str(c["microbatches"]) if c["total_ms"] is not None else "-",
            _gib(c["memory_bytes"]),
            "yes" if c["fits"] else "no",
            _ms(c["compute_ms"]),
            _ms(c["tp_comm_ms"]),
            _ms(c["pp_comm_ms"]),
            _ms(c["total_ms"]),
            escape(note),
            style="bold green" if chosen else "dim" if not c["fits"] else "",
        )
    console.print(table)


@click.command("plan")
@click.argument("source")
@click.option("-t", "--target", required=True, help="Cluster as <N>x<profile>, e.g. 4xnvidia-a100 or 2xhost.")
@click.option("-b", "--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Batch size.")
@click.option("--seq", type=click.IntRange(min=1), default=128, show_default=True, help="Sequence length.")
@click.option("--precision", default="fp32", show_default=True, help="Compute precision (a dtype of the profile).")
@click.option("--tp", type=click.IntRange(min=1), default=None, help="Force the tensor-parallel degree.")
@click.option("--pp", type=click.IntRange(min=1), default=None, help="Force the pipeline-parallel degree.")
@click.option(
    "--microbatches", type=click.IntRange(min=1), default=None, help="GPipe microbatches (default: the fastest)."
)
@click.option("--heads", type=click.IntRange(min=1), default=None, help="Attention heads, if the graph hides them.")
@click.option("--trust-source", is_flag=True, help="Allow a .pt2 source that unpickles objects.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan and every candidate as JSON.")
def plan(source, target, batch, seq, precision, tp, pp, microbatches, heads, trust_source, as_json):
    """Choose tensor/pipeline-parallel degrees for a cluster and print the estimate of every candidate.

    \b
    Examples:
      adapter plan adapter.zoo:minilm --target 2xnvidia-a100
      adapter plan adapter.zoo:gpt2 --target 4xnvidia-a100-pcie --batch 16 --seq 64 --json
      adapter plan model.onnx --target 8xnvidia-a100 --tp 4 --pp 2 --microbatches 4
    """
    out, err = Console(soft_wrap=True, width=_WIDTH), Console(stderr=True, soft_wrap=True, width=_WIDTH)
    cluster = parse_cluster(target)  # bad text fails before the (slow) export
    with err.status("importing the model…"):
        imported = import_source(source, trust_source=trust_source)
        run_pipeline(imported.model, build_pipeline("canonicalize"))
    result = plan_sharding(
        imported.model,
        cluster,
        batch=batch,
        seq=seq,
        precision=precision,
        tp=tp,
        pp=pp,
        microbatches=microbatches,
        heads=heads,
    )
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2, default=str))
    else:
        render_plan(out, result.to_json())
