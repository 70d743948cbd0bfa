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
    line = precision_line(manifest.get("precision") or {})
    if line:
        head.add_row("precision", line)
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

    render_candidates(console, backend)
    kernels = backend["config"].get("kernel_precisions")
    if kernels:
        console.print(
            f"Kernels run ({escape(backend['name'])}'s execution graph): "
            + "; ".join(f"{kind} " + ", ".join(f"{p} {n}" for p, n in found.items()) for kind, found in kernels.items())
        )
    render_precision(console, manifest.get("precision") or {})
    render_target_files(console, backend["config"], ver)
    latency = manifest.get("latency")
    if latency:
        shapes = escape(", ".join(f"{k}{v}" for k, v in latency["inputs"].items()))
        console.print(
            f"Latency on the example inputs ({shapes}), median: engine [bold]{latency['engine_ms']:.2f} ms[/], "
            f"{latency['reference']} {latency['reference_ms']:.2f} ms → [bold]{latency['speedup']:.2f}×[/]"
            + (f"; {_of_roofline(latency['roofline'])} of the roofline" if latency.get("roofline") else "")
        )
    timings = manifest.get("timings_s", {})
    if timings:
        console.print("Stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    if seconds is not None:
        console.print(f"Total {seconds:.2f} s.")


def render_target_files(console: Console, config: dict[str, Any], verification: dict[str, Any]) -> None:
    """For engines built for another machine: what verified them here, the kernels and how to build/run."""
    if verification.get("engine_ran") is False:
        console.print(
            "[bold yellow]The engine was not run on this machine[/] (it is built for another one); "
            f"the figures above come from {escape(verification.get('verified_with', 'a stand-in'))}."
        )
    kernels = config.get("kernels") or {}
    if kernels:
        table = Table(title="Kernels checked with the target's tools", title_justify="left")
        table.add_column("file")
        table.add_column("built for")
        for name, found in kernels.items():
            if isinstance(found, dict):
                found = ", ".join(f"{kind} {' '.join(archs)}" for kind, archs in found.items() if archs)
            table.add_row(escape(name), escape(str(found)))
        console.print(table)
    triton = [k for k in config.get("triton_kernels") or [] if "companion_of" not in k]
    if triton:
        table = Table(title=f"Triton kernels for {escape(triton[0]['arch'])} (tile model's choice)", title_justify="left")
        for col in ("kernel", "nodes", "tiles", "warps", "predicted us", "of peak bandwidth", "bound"):
            table.add_column(col)
        for k in triton:
            guess = k.get("predicted") or {}
            tiles = ",".join(f"{n}={v}" for n, v in k["config"]["blocks"].items())
            table.add_row(escape(k["name"]), str(len(k.get("nodes", []))), escape(tiles), str(k["num_warps"]),
                          f"{guess.get('time_us', 0):.1f}", f"{100 * guess.get('bandwidth_fraction', 0):.0f}%",
                          escape(str(guess.get("bound", ""))))  # fmt: skip
        console.print(table)
    if config.get("note"):
        console.print(escape(str(config["note"])))


def _of_roofline(roof: dict[str, Any] | None) -> str:
    """``31% (2.08 ms at bf16)``: the roofline time over the latency, and the peak used."""
    if not roof or roof.get("fraction") is None:
        return "-"
    return f"{100 * roof['fraction']:.0f}% ({roof['roofline_ms']:.2f} ms at {roof['peak']})"


def render_candidates(console: Console, backend: dict[str, Any]) -> None:
    """The backends ``--backend auto`` built, with their figures and the one kept."""
    candidates = backend.get("candidates") or []
    if len(candidates) < 2:
        return
    table = Table(title="Backends tried (the fastest that verifies is kept)", title_justify="left")
    for col in ("backend", "precision", "latency ms", "of roofline", "max-abs", "cosine", "fusions", "result"):
        table.add_column(col, justify="right" if col in ("latency ms", "of roofline", "max-abs", "cosine") else "left")
    for c in candidates:
        fusions = ", ".join(f"{op.rpartition(':')[2]} {n}" for op, n in (c.get("fused_ops") or {}).items())
        result = (
            "[bold green]kept[/]"
            if c["chosen"]
            else ("verified" if c["verified"] else f"[red]dropped[/] {escape(c.get('problem') or '')}")
        )
        table.add_row(
            f"{c['backend']} {c['version']}",
            c.get("precision") or "",
            f"{c['latency_ms']:.2f}" if c.get("latency_ms") is not None else "-",
            _of_roofline(c.get("roofline")),
            f"{c['max_abs']:.2e}" if c.get("max_abs") is not None else "-",
            f"{c['cosine']:.7f}" if c.get("cosine") is not None else "-",
            escape(fusions) or "-",
            result,
        )
    console.print(table)


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


def _group_modules(modules: dict[str, str]) -> list[tuple[str, str, int]]:
    """Collapse module paths by their layer-index-free pattern: (pattern, precision, count)."""
    import re

    groups: dict[tuple[str, str], int] = {}
    for module, precision in modules.items():
        pattern = re.sub(r"\.\d+(?=\.|$)", ".*", module) or "(graph)"
        groups[(pattern, precision)] = groups.get((pattern, precision), 0) + 1
    return [(pattern, precision, count) for (pattern, precision), count in sorted(groups.items())]


def precision_line(report: dict[str, Any]) -> str:
    """The report's first line: the precision chosen, why, and how to get exact FP32."""
    if report.get("requested") != "default":
        return ""
    line = f"[bold]{report['mode']}[/] — {escape(report.get('reason', ''))}"
    figures = report.get("accuracy") or {}
    if figures:
        judged = report.get("judged_on") or {}
        worst = min(figures.values(), key=lambda f: f["cos"])
        line += (
            f"; budget {escape(report['budget'])} on {judged.get('samples', '?')} samples of "
            f"{escape(judged.get('source', '?'))}: cos {worst['cos']:.5f} (min {worst['cos_min']:.5f}), "
            f"max_rel {max(f.get('max_rel', 0.0) for f in figures.values()):.4f}"
        )
    if report["mode"] != "fp32":
        line += f". Exact FP32: {report.get('exact', '--precision fp32')}"
    return line


def render_precision(console: Console, report: dict[str, Any]) -> None:
    """Precision per module (grouped), layers kept high and why, accuracy vs budget, speed, size."""
    if not report or report.get("requested") == "default" or report.get("mode", "fp32") == "fp32" and not report.get("candidates"):
        return  # the default's choice is the head's precision line
    for warning in report.get("warnings", []):
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    budget = report.get("budget") or "none"
    table = Table(
        title=f"Precision: {report['mode']} (asked: {report['requested']}; budget {escape(budget)})",
        title_justify="left",
    )
    for col in ("modules", "precision", "count"):
        table.add_column(col)
    for pattern, precision, count in _group_modules(report.get("modules", {})):
        table.add_row(escape(pattern), precision, str(count))
    console.print(table)
    kept = report.get("kept_fp32", [])
    if kept:
        reasons: dict[tuple[str, str], list[str]] = {}
        for item in kept:
            key = (item.get("precision", "fp32").upper(), item.get("reason", ""))
            reasons.setdefault(key, []).append(item.get("module") or item["node"])
        for (wider, reason), where in reasons.items():
            shown = ", ".join(sorted(set(where))[:8]) + (" …" if len(set(where)) > 8 else "")
            console.print(f"kept {wider} ({len(where)} nodes) — {escape(reason)}: {escape(shown)}")
    narrow = report.get("narrow_weights", [])
    if narrow:
        shown = ", ".join(
            f"{n['module'] or n['node']}" + (f" ({n['int8']:.3f} → {n['int7']:.3f})" if n.get("int8") is not None else "")
            for n in narrow[:6]
        )
        console.print(
            f"7-bit weights for {len(narrow)} MatMul(s), where this CPU's INT8 kernel saturates "
            f"(output error 8-bit → 7-bit): {escape(shown)}" + (" …" if len(narrow) > 6 else "")
        )
    ran = report.get("kernels")
    if ran:
        off = ", ".join(f"{n} ({p})" for n, p in list(ran["not_low"].items())[:6])
        console.print(
            f"the plan's {ran['lowered']} lowered matrix products run {ran['expected']} kernels: {ran['ran_low']}"
            + (f"; not: {escape(off)}" if off else "")
        )
    for name, fig in (report.get("accuracy") or {}).items():
        console.print(
            f"accuracy {escape(name)} on {report['calibration'].get('evaluated_on', '?')} samples: "
            f"cos mean {fig['cos']:.5f}, min {fig['cos_min']:.5f}, max-abs {fig['max_abs']:.3g}, top1 {fig['top1']:.3f}"
        )
    lat, size = report.get("latency_ms", {}), report.get("size_bytes", {})
    if lat.get("plan"):
        console.print(
            f"latency {lat['plan']:.2f} ms vs FP32 {lat['fp32']:.2f} ms on the same backend → "
            f"[bold]{report['speedup_vs_fp32']:.2f}×[/]; size {size['fp32'] / 1e6:.1f} MB → {size['plan'] / 1e6:.1f} MB"
        )
    candidates = report.get("candidates", [])
    if len(candidates) > 1:
        rows = ", ".join(
            f"{c['mode']}: "
            + (
                f"{c['latency_ms']:.2f} ms, {c['kept_fp32']} kept"
                if c["holds"]
                else c.get("skipped") or "budget not met"
            )
            for c in candidates
        )
        console.print(f"candidates — {escape(rows)}")


def render_check(console: Console, report: dict[str, Any]) -> None:
    """Print ``adapter check``: per backend, whether it runs the model, else every node it refuses."""
    for b in report["backends"]:
        head = f"{b['backend']} {b['version']}".strip()
        if b["problem"]:
            console.print(f"[yellow]{escape(head)}[/]: not checked: {escape(b['problem'])}")
            continue
        if b["runs"]:
            console.print(f"[green]{escape(head)}[/]: runs all {b['nodes']} nodes")
            continue
        table = Table(title=f"{head}: cannot run {len(b['refused'])} of {b['nodes']} nodes", title_justify="left")
        for col in ("node", "op", "module", "why", "suggested fix"):
            table.add_column(col)
        for op in b["refused"]:
            name = f"{op['domain']}::{op['op_type']}" if op["domain"] else op["op_type"]
            table.add_row(escape(op["node"]), name, escape(op["module"] or "-"), escape(op["reason"]), escape(op["suggestion"]))
        console.print(table)
    verdict = "[bold green]ok[/]" if report["ok"] else "[bold red]no backend can run this model[/]"
    if report["requested"] != "auto" and not report["ok"]:
        verdict = f"[bold red]backend '{report['requested']}' cannot run this model[/]"
    console.print(f"{verdict} (target {report['target']}, backend {report['requested']})")
