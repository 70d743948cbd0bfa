"""What ``adapter profile`` writes: a terminal table, JSON, a Chrome-trace timeline, PNG plots
(a module × batch heatmap and a roofline) and one self-contained HTML page.

Every file is written to a temporary name beside its destination and renamed into place,
so a reader never sees half a file. Plots use matplotlib's Agg backend (no display).
"""

from __future__ import annotations

__all__ = ["render_terminal", "write_json", "write_trace", "heatmap_png", "roofline_png", "write_html", "write_all"]

import base64
import html
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

_KIND_COLOURS = {
    "matmul": "#1f77b4",
    "attention": "#9467bd",
    "norm": "#d62728",
    "softmax": "#ff7f0e",
    "activation": "#2ca02c",
    "elementwise": "#8c564b",
    "movement": "#7f7f7f",
    "other": "#bcbd22",
}


def _data(report) -> dict[str, Any]:
    return report.to_json() if hasattr(report, "to_json") else report


def _atomic_write(path: Path, payload: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def kind_of(op_type: str) -> str:
    """A coarse kind for colouring and labelling: matmul, attention, norm, softmax, ..."""
    op = op_type.lower()
    if "attention" in op or op == "subgraph":
        return "attention"
    if any(k in op for k in ("matmul", "gemm", "conv", "fullyconnected", "dense")):
        return "matmul"
    if "norm" in op or op == "mvn":
        return "norm"
    if "softmax" in op:
        return "softmax"
    if any(k in op for k in ("gelu", "relu", "sigmoid", "tanh", "erf", "swish", "silu")):
        return "activation"
    if any(k in op for k in ("add", "mul", "sub", "div", "pow", "sqrt", "where", "eltwise", "reduce", "max", "min")):
        return "elementwise"
    if any(
        k in op for k in ("reshape", "transpose", "gather", "concat", "slice", "shape", "cast", "expand", "squeeze")
    ):
        return "movement"
    return "other"


def _module_kind(module: dict[str, Any], nodes: dict[str, dict[str, Any]]) -> str:
    """The kind of the node that takes most of a module's time."""
    members = [nodes[n] for n in module["nodes"] if n in nodes]
    if not members:
        return "other"
    return kind_of(max(members, key=lambda n: n["ms"])["op_type"])


def _si(value: float | None, unit: str = "") -> str:
    if value is None:
        return "–"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.2f} {unit}".rstrip()


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _totals_line(run: dict[str, Any]) -> str:
    ratio = run["sum_of_modules_ms"] / run["end_to_end_ms"] if run["end_to_end_ms"] else float("nan")
    return (
        f"batch {run['batch']}, seq {run['seq']}: modules sum to {run['sum_of_modules_ms']:.3f} ms, "
        f"end-to-end (no profiler) {run['end_to_end_ms']:.3f} ms → {100 * ratio:.1f}% attributed; "
        f"profiled run {run['profiled_total_ms']:.3f} ms"
    )


# ----------------------------------------------------------------------------- terminal


def render_terminal(report, console: Console, top: int = 15) -> None:
    """Print per run the ``top`` modules by latency and the totals line."""
    data = _data(report)
    ceilings = data["ceilings"]
    console.print(
        f"[bold]{escape(data['artifact'])}[/] — {data['backend']} on {data['target']} ({data['precision']}); "
        f"roof {_si(ceilings['peak_flops'], 'FLOP/s')}, {_si(ceilings['memory_bandwidth'], 'B/s')}, "
        f"ridge {ceilings['ridge_intensity']:.1f} FLOP/B"
    )
    for run in data["runs"]:
        table = Table(title=f"Top {top} modules — batch {run['batch']}, seq {run['seq']}", title_justify="left")
        for column in ("module", "ms", "share", "FLOPs", "bytes", "FLOP/B", "FLOP/s", "B/s", "efficiency", "bound"):
            table.add_column(column, justify="left" if column in ("module", "bound") else "right")
        for module in run["modules"][:top]:
            table.add_row(
                escape(module["module"]),
                f"{module['ms']:.3f}",
                _pct(module["share"]),
                _si(module["flops"]),
                _si(module["bytes"]),
                "–" if module["intensity"] is None else f"{module['intensity']:.1f}",
                _si(module["achieved_flops"]),
                _si(module["achieved_bytes_per_s"]),
                _pct(module["efficiency"]),
                module["bound"] or "–",
            )
        console.print(table)
        console.print(_totals_line(run))
        if run.get("throughput_per_s"):
            console.print(f"throughput {run['throughput_per_s']:.1f} samples/s")
        if run.get("note"):
            console.print(f"[dim]{escape(run['note'])}[/]")
    memory = data.get("memory")
    if memory:
        console.print(
            f"memory: weights {_si(memory.get('weights_bytes'), 'B')}, activation peak (estimate) "
            f"{_si(memory.get('activation_peak_bytes_estimate'), 'B')}, process RSS delta "
            f"{_si(memory.get('rss_delta_bytes'), 'B')}"
        )


# ----------------------------------------------------------------------------- files


def write_json(report, path: Path | str) -> None:
    _atomic_write(Path(path), json.dumps(_data(report), indent=2).encode())


def write_trace(report, path: Path | str) -> None:
    """The Chrome-trace / Perfetto JSON timeline (open it in ui.perfetto.dev or chrome://tracing)."""
    _atomic_write(Path(path), json.dumps(report.trace()).encode())


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _natural(name: str) -> list:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.]", name)]


def heatmap_bytes(report, metric: str = "share") -> bytes:
    """A modules × (batch, seq) heatmap of latency share or roofline efficiency, as PNG bytes."""
    if metric not in ("share", "efficiency"):
        raise ValueError(f"metric must be 'share' or 'efficiency', not {metric!r}")
    plt = _figure()
    data = _data(report)
    runs = data["runs"]
    names = {m["module"] for run in runs for m in run["modules"]}
    order = sorted(names, key=_natural)  # model order: layer.2 before layer.10
    grid = []
    for name in order:
        row = []
        for run in runs:
            found = next((m for m in run["modules"] if m["module"] == name), None)
            value = found.get(metric) if found else None
            row.append(float("nan") if value is None else 100 * value)
        grid.append(row)
    height = max(3.0, 0.28 * len(order) + 1.5)
    fig, ax = plt.subplots(figsize=(3.2 + 1.3 * len(runs), height))
    image = ax.imshow(grid, aspect="auto", cmap="viridis" if metric == "share" else "magma")
    ax.set_yticks(range(len(order)), labels=order, fontsize=7)
    ax.set_xticks(range(len(runs)), labels=[f"b{r['batch']}\ns{r['seq']}" for r in runs], fontsize=8)
    for y, row in enumerate(grid):
        for x, value in enumerate(row):
            if value == value:  # not NaN
                bright = image.norm(value) > 0.6
                ax.text(
                    x, y, f"{value:.1f}", ha="center", va="center", fontsize=6, color="black" if bright else "white"
                )
    title = "latency share (%)" if metric == "share" else "roofline efficiency (% of ceiling)"
    ax.set_title(f"{title}\n{data['backend']} · {data['target']} · {data['precision']}", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    payload = _png(fig)
    plt.close(fig)
    return payload


def heatmap_png(report, path: Path | str, metric: str = "share") -> None:
    _atomic_write(Path(path), heatmap_bytes(report, metric))


def roofline_bytes(report) -> bytes:
    """Log-log roofline: the compute and bandwidth roofs, every module (circles) and every
    node op type (crosses, FLOP-weighted per type) of the largest run, coloured by kind."""
    plt = _figure()
    data = _data(report)
    ceilings = data["ceilings"]
    peak, bandwidth, ridge = ceilings["peak_flops"], ceilings["memory_bandwidth"], ceilings["ridge_intensity"]
    run = max(data["runs"], key=lambda r: (r["batch"] or 0, r["seq"] or 0))
    nodes = {n["name"]: n for n in run["nodes"]}
    modules = [m for m in run["modules"] if m["intensity"] and m["achieved_flops"]]
    by_op: dict[str, list[float]] = {}
    for node in run["nodes"]:
        if node["flops"] and node["bytes"] and node["ms"] > 0:
            entry = by_op.setdefault(node["op_type"], [0.0, 0.0, 0.0])
            entry[0] += node["flops"]
            entry[1] += node["bytes"]
            entry[2] += node["ms"]
    intensities = [m["intensity"] for m in modules] + [f / b for f, b, _ in by_op.values()] + [ridge]
    low, high = min(intensities) / 4, max(intensities) * 4
    fig, ax = plt.subplots(figsize=(8.5, 5.8))
    xs = [low, ridge, high]
    ax.plot(xs, [min(peak, bandwidth * x) for x in xs], color="black", linewidth=1.6, label="roofline")
    ax.axvline(ridge, color="grey", linestyle=":", linewidth=0.8)
    ax.text(ridge, peak * 1.15, f"ridge {ridge:.1f} FLOP/B", fontsize=7, ha="center")
    ax.text(high, peak * 1.15, f"peak {_si(peak, 'FLOP/s')}", fontsize=7, ha="right")
    ax.text(low * 1.3, bandwidth * low * 1.6, f"{_si(bandwidth, 'B/s')}", fontsize=7, rotation=30)
    seen: set[str] = set()
    for module in modules:
        kind = _module_kind(module, nodes)
        ax.scatter(
            module["intensity"],
            module["achieved_flops"],
            s=30 + 400 * module["share"],
            color=_KIND_COLOURS[kind],
            alpha=0.75,
            edgecolors="black",
            linewidths=0.4,
            label=f"module: {kind}" if kind not in seen else None,
        )
        seen.add(kind)
    for op_type, (flops, nbytes, ms) in by_op.items():
        kind = kind_of(op_type)
        x, y = flops / nbytes, flops / (ms / 1e3)
        ax.scatter(x, y, marker="x", s=40, color=_KIND_COLOURS[kind], linewidths=1.4)
        ax.annotate(op_type, (x, y), textcoords="offset points", xytext=(4, -9), fontsize=6.5)
    ax.scatter([], [], marker="x", color="black", label="op type (all its nodes)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(low, high)
    finite = [m["achieved_flops"] for m in modules] + [f / (ms / 1e3) for f, _, ms in by_op.values()]
    ax.set_ylim(min(finite + [peak]) / 4, peak * 2.5)
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("achieved FLOP/s")
    ax.set_title(
        f"Roofline — {data['backend']} · {data['target']} · {data['precision']} · batch {run['batch']}, seq {run['seq']}",
        fontsize=9,
    )
    ax.grid(True, which="both", linewidth=0.3, alpha=0.5)
    ax.legend(fontsize=7, loc="lower right")
    payload = _png(fig)
    plt.close(fig)
    return payload


def roofline_png(report, path: Path | str) -> None:
    _atomic_write(Path(path), roofline_bytes(report))


# ----------------------------------------------------------------------------- HTML

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } td.l, th.l { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
.totals { font-weight: bold; } .note { color: #666; }
"""

_CHECK = """
(function () {
  function check() {
    var images = Array.prototype.slice.call(document.images);
    var ok = images.every(function (im) { return im.complete && im.naturalWidth > 0; });
    document.title = ok ? "profile ready: " + images.length + " images" : "profile: broken image";
    document.body.setAttribute("data-images", ok ? "ok" : "broken");
  }
  if (document.readyState === "complete") { check(); } else { window.addEventListener("load", check); }
})();
"""
"""Sets the title once every embedded image has decoded (the headless-browser test reads it);
the page needs no script to be read."""


def _cell(value: Any, left: bool = False) -> str:
    return f'<td class="l">{html.escape(str(value))}</td>' if left else f"<td>{html.escape(str(value))}</td>"


def _run_table(run: dict[str, Any], top: int) -> str:
    head = ["module", "ms", "share", "FLOPs", "bytes", "FLOP/B", "FLOP/s", "B/s", "efficiency", "bound", "nodes"]
    rows = ["<tr>" + "".join(f'<th class="{"l" if h == "module" else ""}">{h}</th>' for h in head) + "</tr>"]
    for module in run["modules"][:top]:
        cells = [
            _cell(module["module"], left=True),
            _cell(f"{module['ms']:.3f}"),
            _cell(_pct(module["share"])),
            _cell(_si(module["flops"])),
            _cell(_si(module["bytes"])),
            _cell("–" if module["intensity"] is None else f"{module['intensity']:.1f}"),
            _cell(_si(module["achieved_flops"])),
            _cell(_si(module["achieved_bytes_per_s"])),
            _cell(_pct(module["efficiency"])),
            _cell(module["bound"] or "–"),
            _cell(len(module["nodes"])),
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>" + "".join(rows) + "</table>"


def _node_table(run: dict[str, Any], top: int) -> str:
    head = ["node", "op", "module", "ms", "share", "FLOP/B", "FLOP/s", "efficiency", "bound"]
    rows = ["<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for node in run["nodes"][:top]:
        cells = [
            _cell(node["name"], left=True),
            _cell(node["op_type"], left=True),
            _cell(node["module"], left=True),
            _cell(f"{node['ms']:.3f}"),
            _cell(_pct(node["share"])),
            _cell("–" if node["intensity"] is None else f"{node['intensity']:.1f}"),
            _cell(_si(node["achieved_flops"])),
            _cell(_pct(node["efficiency"])),
            _cell(node["bound"] or "–"),
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>" + "".join(rows) + "</table>"


def html_text(report, top: int = 20) -> str:
    """The report as one HTML page: tables, totals, and the PNGs inlined as data URIs."""
    data = _data(report)
    images = {
        "Roofline": roofline_bytes(report),
        "Latency share per module and batch size": heatmap_bytes(report, "share"),
        "Roofline efficiency per module and batch size": heatmap_bytes(report, "efficiency"),
    }
    ceilings = data["ceilings"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>profile: {html.escape(Path(data['artifact']).name)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Profile of {html.escape(data['artifact'])}</h1>",
        f"<p>{html.escape(data['backend'])} on <b>{html.escape(data['target'])}</b>, precision "
        f"{html.escape(data['precision'])}. Roof: peak {_si(ceilings['peak_flops'], 'FLOP/s')}, bandwidth "
        f"{_si(ceilings['memory_bandwidth'], 'B/s')}, ridge {ceilings['ridge_intensity']:.2f} FLOP/byte.</p>",
    ]
    for run in data["runs"]:
        parts.append(f"<h2>Batch {run['batch']}, seq {run['seq']}</h2>")
        parts.append(f'<p class="totals">{html.escape(_totals_line(run))}</p>')
        if run.get("throughput_per_s"):
            parts.append(f"<p>Throughput {run['throughput_per_s']:.1f} samples/s.</p>")
        if run.get("note"):
            parts.append(f'<p class="note">{html.escape(run["note"])}</p>')
        parts.append(f"<h3>Top modules</h3>{_run_table(run, top)}")
        parts.append(f"<h3>Top nodes</h3>{_node_table(run, top)}")
    memory = data.get("memory")
    if memory:
        parts.append(
            "<h2>Memory</h2><p>"
            f"Weights {_si(memory.get('weights_bytes'), 'B')}; activation peak (estimate: "
            f"{html.escape(str(memory.get('activation_basis', '')))}) {_si(memory.get('activation_peak_bytes_estimate'), 'B')}; "
            f"process RSS delta (measured, loading and first runs) {_si(memory.get('rss_delta_bytes'), 'B')}.</p>"
        )
    for caption, png in images.items():
        encoded = base64.b64encode(png).decode()
        parts.append(
            f'<h2>{html.escape(caption)}</h2><img alt="{html.escape(caption)}" src="data:image/png;base64,{encoded}">'
        )
    parts.append(f"<script>{_CHECK}</script></body></html>")
    return "\n".join(parts)


def write_html(report, folder: Path | str) -> Path:
    """Write ``report.html`` into ``folder``; returns its path."""
    path = Path(folder) / "report.html"
    _atomic_write(path, html_text(report).encode())
    return path


def write_all(report, out_dir: Path | str) -> dict[str, Path]:
    """Write profile.json, trace.json, heatmap.png, roofline.png and report.html into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "profile.json",
        "trace": out / "trace.json",
        "heatmap": out / "heatmap.png",
        "roofline": out / "roofline.png",
        "html": out / "report.html",
    }
    write_json(report, paths["json"])
    write_trace(report, paths["trace"])
    heatmap_png(report, paths["heatmap"])
    roofline_png(report, paths["roofline"])
    write_html(report, out)
    return paths
