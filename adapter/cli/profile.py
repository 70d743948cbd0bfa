"""``adapter profile``: per-node and per-module profile of an engine artifact.

Registered on the main group with ``cli.add_command(profile)``; errors are
:class:`adapter.core.errors.AdapterError`, which ``adapter.cli.main.main`` prints as one paragraph.
"""

from __future__ import annotations

__all__ = ["profile"]

import json
from pathlib import Path

import click

from adapter.profile.outputs import render_terminal, write_all
from adapter.profile.profiler import profile_artifact


def _batch_sizes(ctx, param, value: str) -> list[int]:
    try:
        sizes = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of integers, e.g. 1,4,16.") from None
    if not sizes or any(size < 1 for size in sizes):
        raise click.BadParameter("give one or more batch sizes of at least 1, e.g. 1,4,16.")
    return sizes


@click.command("profile")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--batch-sizes",
    default="1,4,16",
    show_default=True,
    callback=_batch_sizes,
    help="Comma-separated batch sizes (a fixed-shape engine runs its own shape only).",
)
@click.option(
    "--seq", type=click.IntRange(min=1), default=128, show_default=True, help="Sequence length for text inputs."
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Write profile.json, trace.json, heatmap.png, roofline.png and report.html here.",
)
@click.option(
    "--group-depth",
    type=click.IntRange(min=1),
    default=None,
    help="Module path parts to group by (default: the layer level, e.g. model.encoder.layer.0.attention).",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=None,
    help="Profiled runs per batch size [default: enough for about 1.5 s of engine time, 10 to 100].",
)
@click.option("--top", type=click.IntRange(min=1), default=15, show_default=True, help="Modules shown in the table.")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON instead of tables.")
def profile(artifact, batch_sizes, seq, output, group_depth, repeats, top, as_json):
    """Profile an engine ARTIFACT per node and per module, on its target's roofline.

    Uses the backend's own profiler (ONNX Runtime's, OpenVINO's performance counters,
    TVM's VM instrumentation); FLOPs and bytes come from the op library.

    \b
    Examples:
      adapter profile minilm-host --batch-sizes 1,4 --seq 128 -o prof/
      adapter profile engine/ --json > profile.json
    """
    from rich.console import Console

    err = Console(stderr=True)
    with err.status("profiling…"):
        report = profile_artifact(
            artifact, batch_sizes, seq, group_depth, repeats=repeats, metrics=("latency", "throughput", "memory")
        )
        paths = write_all(report, output) if output is not None else None
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    out = Console(soft_wrap=True, width=None if click.get_text_stream("stdout").isatty() else 160)
    render_terminal(report, out, top=top)
    if paths:
        out.print("Wrote " + ", ".join(str(p) for p in paths.values()))
