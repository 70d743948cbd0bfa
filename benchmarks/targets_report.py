"""The terminal table and summary of ``benchmarks/targets.py``'s cells (also ``--report`` of a saved run)."""

from __future__ import annotations

__all__ = ["ELF_MACHINES", "fmt", "report", "summary", "table"]

from pathlib import Path
from typing import Any

from rich.table import Table

ELF_MACHINES = {"x86_64": "Advanced Micro Devices X86-64", "aarch64": "AArch64"}
"""``readelf -h`` Machine line per CPU architecture."""


def _kernel_summary(kernels: dict[str, Any]) -> str:
    checked = kernels.get("checked", {})
    archs: set[str] = set()
    count = 0
    for name, found in checked.items():
        if name.endswith((".cubin", ".fatbin")) and found:
            archs.update(found.get("elf", []))
            archs.update(found.get("ptx", []))
            count += 1
        elif name.endswith(".hsaco") and found:
            archs.add(found)
            count += 1
    parts = [f"{'+'.join(sorted(archs))} x{count}"] if count else []
    library = next((v for k, v in checked.items() if k.endswith(".so")), None)
    if library:
        short = {elf: machine for machine, elf in ELF_MACHINES.items()}
        parts.append(f"lib.so {short.get(library, library)}")
    return "; ".join(parts)


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cos(value: float | None) -> str:
    """A cosine as its distance from 1 (figures near 1 all print as 1.0000000 otherwise)."""
    return "-" if value is None else f"1-{max(1.0 - value, 0.0):.1e}"


def _verification_text(cell: dict) -> str:
    worst = (cell.get("verification") or {}).get("worst") or {}
    return (
        "\n".join(
            f"{name}: cos {_cos(w.get('cosine'))} max {fmt(w.get('max_abs'), '.1e')}" for name, w in worst.items()
        )
        or "-"
    )


def _ran_text(cell: dict) -> str:
    verification = cell.get("verification") or {}
    if not verification:
        return "-"
    if verification.get("engine_ran", True):
        return "engine"
    return "stand-in: " + " ".join(str(verification.get("verified_with", "")).split()[:3])


def _extra_text(cell: dict) -> str:
    if "kernels" in cell:
        text = _kernel_summary(cell["kernels"])
        return text if cell["kernels"]["ok"] else f"{text}\nPROBLEM: {'; '.join(cell['kernels']['problems'])[:120]}"
    if "tensorrt" in cell:
        trt = cell["tensorrt"]
        recipe = ",".join(n for n, there in trt["recipe"].items() if there)
        return f"plan built: {trt['engine_built']}; {recipe}"
    if "migraphx" in cell:
        mgx = cell["migraphx"]
        return f"ort_providers.json: {mgx['ort_providers.json']}; session here: {mgx['session_here']}"
    return ""


def _qemu_text(cell: dict) -> str:
    run = cell.get("qemu")
    if not run:
        return "-"
    if "error" in run:
        return "ERROR"
    cosines = [o.get("cosine") for o in run["outputs"].values()]
    low = min((c for c in cosines if c is not None), default=None)
    high = max((o.get("max_abs") or 0.0 for o in run["outputs"].values()), default=None)
    return (
        f"{run['machine']} cos {_cos(low)} max {fmt(high, '.1e')}\n"
        f"{'PASS' if run['passed'] else 'FAIL'} {run['seconds']:.0f}s"
    )


def table(cells: list[dict]):
    table = Table(title="adapter: zoo x (target, backend)", show_lines=True)
    for column in (
        "model",
        "target/backend",
        "status",
        "rc",
        "s",
        "cache",
        "verification (worst per output)",
        "verified on",
        "kernels / recipe",
        "files (MB)",
        "qemu aarch64",
    ):
        table.add_column(column, overflow="fold")
    colours = {"ok": "green", "refused": "yellow", "failed": "red", "crashed": "bold red"}
    for cell in cells:
        status = cell["status"]
        files = cell.get("files")
        table.add_row(
            cell["model"],
            f"{cell['target']}/{cell['backend']}",
            f"[{colours.get(status, 'white')}]{status}[/]",
            str(cell.get("rc", "-")),
            fmt(cell.get("seconds"), ".0f"),
            "hit" if cell.get("cache_hit") else "-",
            _verification_text(cell),
            _ran_text(cell),
            _extra_text(cell),
            f"{len(files)} ({cell['bytes'] / 1e6:.2f})" if files else "-",
            _qemu_text(cell),
        )
    return table


def summary(cells: list[dict], expected_refusals: set[str]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for cell in cells:
        counts[cell["status"]] = counts.get(cell["status"], 0) + 1
    bad = [
        f"{cell['model']}@{cell['target']}/{cell['backend']}"
        for cell in cells
        if cell["status"] != "ok"
        and not (
            cell["status"] == "refused" and f"{cell['model']}@{cell['target']}/{cell['backend']}" in expected_refusals
        )
    ]
    return {"cells": len(cells), "counts": counts, "unexpected": bad}


def report(console, cells: list[dict], expected_refusals: set[str], json_path: Path, seconds: float) -> int:
    """Print the table, each cell that is not ok with its reason, and the counts; the exit status."""
    console.print(table(cells))
    for cell in cells:
        if cell["status"] != "ok":
            why = cell.get("error") or "; ".join(cell.get("problems", []))
            console.print(
                f"[bold]{cell['model']}@{cell['target']}/{cell['backend']}[/] {cell['status']}: {why}", highlight=False
            )
    counted = summary(cells, expected_refusals)
    counts = ", ".join(f"{n} {status}" for status, n in sorted(counted["counts"].items()))
    console.print(
        f"{counted['cells']} cells: {counts}; {len(counted['unexpected'])} unexpected failures; "
        f"{seconds:.0f} s; JSON: {json_path}",
        highlight=False,
    )
    return 1 if counted["unexpected"] else 0
