"""Rich tables for the CLI: the convert report, artifact info, targets, run outputs."""

from __future__ import annotations

__all__ = ["render_manifest", "render_targets", "render_outputs"]

from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _shape(spec: dict[str, Any]) -> str:
    dims = [d if isinstance(d, int) else f"{d['name']}[{d['min']}..{d['max']}]" for d in spec["shape"]]
    return escape(f"{spec['dtype']}[{', '.join(map(str, dims))}]")


def render_manifest(
    console: Console, manifest: dict[str, Any], *, cache_note: str = "", seconds: float | None = None
) -> None:
    """Print the convert report (also ``adapter info``) from an artifact's manifest."""
    src, tgt, backend = manifest["source"], manifest["target"], manifest["backend"]
    head = Table.grid(padding=(0, 2))
    head.add_row("source", f"{escape(src['spec'])} ({src['kind']}, sha256 {src['digest'][:12]})")
    head.add_row("target", f"{tgt['name']} — {tgt['profile'].get('description', '')}")
    head.add_row("backend", f"{backend['name']} {backend['version']}, {backend['config'].get('threads', '?')} threads")
    head.add_row("graph", f"{manifest['graph']['nodes']} nodes, opsets {manifest['graph']['opsets']}")
    for spec in manifest["inputs"]:
        head.add_row("input", f"{spec['name']}: {_shape(spec)}")
    for spec in manifest["outputs"]:
        head.add_row("output", f"{spec['name']}: {_shape(spec)}")
    if cache_note:
        head.add_row("cache", escape(cache_note))
    console.print(head)

    passes = Table(title="Passes", title_justify="left")
    for col in ("pass", "changed", "what it did", "ms"):
        passes.add_column(col, justify="right" if col == "ms" else "left")
    for record in manifest["passes"]:
        parts = [f"{k}={v}" for k, v in record["counters"].items()]
        if record["nodes_before"] != record["nodes_after"]:
            parts.append(f"nodes {record['nodes_before']}→{record['nodes_after']}")
        passes.add_row(
            record["name"], "yes" if record["modified"] else "no", ", ".join(parts), f"{record['seconds'] * 1e3:.0f}"
        )
    console.print(passes)

    ver = manifest["verification"]
    tol = ver["tolerance"]
    table = Table(
        title=f"Verification against {src['reference']} (max-abs ≤ {tol['atol']:g} + {tol['rtol']:g}·max|ref|, cosine ≥ {tol['min_cosine']})",
        title_justify="left",
    )
    for col in ("case", "output", "max-abs", "cosine", "ok"):
        table.add_column(col)
    for case in ver["cases"]:
        for name, fig in case["outputs"].items():
            table.add_row(
                escape(case["case"]),
                name,
                f"{fig.get('max_abs', float('nan')):.2e}",
                f"{fig.get('cosine', float('nan')):.8f}",
                "[green]pass[/]" if fig["passed"] else f"[red]FAIL[/] {escape(fig.get('problem', ''))}",
            )
    console.print(table)

    latency = manifest.get("latency")
    if latency:
        shapes = escape(", ".join(f"{k}{v}" for k, v in latency["inputs"].items()))
        console.print(
            f"Latency on the example inputs ({shapes}), median: engine [bold]{latency['engine_ms']:.2f} ms[/], "
            f"{latency['reference']} {latency['reference_ms']:.2f} ms → [bold]{latency['speedup']:.2f}×[/]"
        )
    timings = manifest.get("timings_s", {})
    if timings:
        console.print("Stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    if seconds is not None:
        console.print(f"Total {seconds:.2f} s.")


def render_targets(console: Console, rows: list[dict[str, Any]]) -> None:
    """Print the table of target profiles."""
    table = Table(title="Target profiles", title_justify="left")
    table.add_column("name", no_wrap=True)
    for col in ("kind", "FP32 TF/s", "BF16 TF/s", "GB/s", "GiB", "precisions", "default backend"):
        table.add_column(col, overflow="fold")

    def tflops(peaks: dict[str, float], dtype: str) -> str:
        return f"{peaks[dtype] / 1e12:.2f}" if dtype in peaks else "—"

    for row in rows:
        peaks = row.get("peak_flops", {})
        table.add_row(
            row["name"],
            row.get("kind", ""),
            tflops(peaks, "fp32"),
            tflops(peaks, "bf16"),
            f"{row.get('memory_bandwidth', 0) / 1e9:.0f}",
            f"{row.get('memory_size', 0) / 2**30:.0f}",
            " ".join(row.get("precisions", [])),
            row.get("default_backend", ""),
        )
    console.print(table)


def render_outputs(console: Console, outputs: dict[str, np.ndarray]) -> None:
    """Print each output's shape, dtype and summary statistics."""
    table = Table(title="Outputs", title_justify="left")
    for col in ("output", "dtype", "shape", "min", "max", "mean"):
        table.add_column(col)
    for name, value in outputs.items():
        numeric = value.size and np.issubdtype(value.dtype, np.number)
        stats = (f"{value.min():.6g}", f"{value.max():.6g}", f"{value.mean():.6g}") if numeric else ("", "", "")
        table.add_row(name, str(value.dtype), str(list(value.shape)), *stats)
    console.print(table)
