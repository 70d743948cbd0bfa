"""``adapter bench``: run a regression-benchmark suite, compare two runs.

Registered on the main CLI with ``cli.add_command(bench)``; errors are
:class:`adapter.core.errors.AdapterError` and reach ``adapter.cli.main.main``, which prints them as
one paragraph. ``adapter bench SUITE.yaml`` is short for ``adapter bench run SUITE.yaml``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from adapter.bench.runner import (
    compare,
    default_history_path,
    load_results,
    load_warnings,
    machine_differences,
    run_suite,
)

__all__ = ["bench", "REGRESSION_EXIT"]

REGRESSION_EXIT = 3
"""Exit code of ``adapter bench compare`` when a case regressed."""

_WIDTH = None if sys.stdout.isatty() else 160
_STYLES = {"regression": "bold red", "improvement": "green", "unchanged": "", "noisy": "yellow", "missing": "magenta"}


def _consoles() -> tuple[Console, Console]:
    # made per command: click's test runner swaps sys.stdout between invocations
    return Console(soft_wrap=True, width=_WIDTH), Console(stderr=True, soft_wrap=True, width=_WIDTH)


class _BenchGroup(click.Group):
    """A group whose first argument, when it is not a subcommand, is a suite for ``run``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_BenchGroup)
def bench() -> None:
    """Regression benchmarks for CI: run a suite, keep a history, compare runs.

    \b
    Examples:
      adapter bench benchmarks/suites/minilm-cpu.yaml -o new.json
      adapter bench compare baseline.json new.json
      adapter bench compare history:latest~1 history:latest
    """


@bench.command("run")
@click.argument("suite", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Write the results JSON here.")
@click.option(
    "--history",
    type=click.Path(path_type=Path),
    default=None,
    help="SQLite history to append to; default: <cache>/bench/history.sqlite.",
)
@click.option("--no-history", is_flag=True, help="Do not record this run in the history.")
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="Engine threads for every case (overrides the suite)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the results JSON instead of a table.")
def run_cmd(suite, output, history, no_history, threads, as_json):
    """Convert and time every case of SUITE (YAML); print and save the results.

    Each case is timed in `repeats` blocks of `iterations` calls, all cases in rotating
    blocks; a sample is the fastest call of its block by default (`statistic`). A probe
    timed between blocks has blocks caught in one of the machine's slow windows timed
    again (for at most `guard_s` seconds). The results carry the raw calls, the samples
    and a fingerprint of the machine.
    """
    out, err = _consoles()
    db = None if no_history else (history or default_history_path())
    with err.status("bench…") as status:
        results = run_suite(suite, db, progress=lambda s: status.update(f"{escape(s)}…"), threads=threads)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2) + "\n")
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    table = Table(title=f"{escape(results['suite'])} — run {results['run_id']}")
    for column in ("case", "backend", "median ms", "MAD ms", "spread", "throughput/s", "samples"):
        table.add_column(column, justify="left" if column in ("case", "backend") else "right")
    for case in results["cases"]:
        table.add_row(
            escape(case["name"]),
            escape(str(case.get("backend", ""))),
            f"{case['median_ms']:.3f}",
            f"{case['mad_ms']:.3f}",
            f"{case['rsd']:.1%}",
            f"{case['throughput']:.1f}" if case.get("throughput") else "",
            str(len(case["samples_ms"])),
        )
    out.print(table)
    fp = results["fingerprint"]
    out.print(
        f"machine {fp['machine_id']}: {escape(str(fp['cpu']))}, {fp['cores']} cores, "
        f"{fp['memory_bytes'] / 2**30:.1f} GiB, {escape(fp['os'])}"
    )
    guard = results.get("guard")
    if guard:
        counts = [case.get("guard", {}) for case in results["cases"]]
        retimed = sum(c.get("retimed_blocks", 0) for c in counts)
        unclean = sum(c.get("unclean_blocks", 0) for c in counts)
        out.print(
            f"machine guard: {retimed} block(s) timed again in {guard['spent_s']:g} s "
            f"(probe level {guard['level_ms']:.3f} ms); {unclean} kept although slow"
        )
    if output:
        out.print(f"results: {escape(str(output))}")
    if db:
        out.print(f"history: {escape(str(db))}")


@bench.command("compare")
@click.argument("baseline")
@click.argument("new")
@click.option("--threshold", type=float, default=0.10, show_default=True, help="Relative change that matters.")
@click.option("--alpha", type=float, default=0.01, show_default=True, help="Significance level of the U test.")
@click.option(
    "--history",
    type=click.Path(path_type=Path),
    default=None,
    help="SQLite history for history: selectors; default: <cache>/bench/history.sqlite.",
)
@click.option(
    "--band-runs",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Widen the noise band by the spread of this many earlier runs per case in the history (0: off).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the verdicts as JSON.")
@click.pass_context
def compare_cmd(ctx, baseline, new, threshold, alpha, history, band_runs, as_json):
    """Judge every case of NEW against BASELINE; exit 3 when a case regressed.

    BASELINE and NEW are results JSON (`adapter bench run -o`), pytest-benchmark JSON
    (`--benchmark-json`; raw samples from stats.data), or history selectors:
    history:latest, history:latest~1 (the run before), history:<run id>.

    A case regresses when its median grew by more than --threshold, by more than the noise
    band (3 standard errors of the difference of medians, from the baseline's MAD) and the
    Mann-Whitney U test on the raw samples gives p < --alpha; a change past the threshold
    failing either of the other two is "noisy" (exit 0).
    """
    out, err = _consoles()
    old_run, new_run = load_results(baseline, history), load_results(new, history)
    verdicts = compare(old_run, new_run, threshold, alpha, history, band_runs)
    differences = machine_differences(old_run, new_run)
    busy = load_warnings(old_run, "baseline") + load_warnings(new_run, "new run")
    regressed = [v for v in verdicts if v.verdict == "regression"]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "baseline": old_run.get("source"),
                    "new": new_run.get("source"),
                    "threshold": threshold,
                    "alpha": alpha,
                    "machine_differences": differences,
                    "load_warnings": busy,
                    "verdicts": [v.to_json() for v in verdicts],
                    "regressions": len(regressed),
                },
                indent=2,
            )
        )
    else:
        if differences:
            err.print(
                "[bold yellow]warning:[/] the runs come from different machines or software, so timings may differ "
                f"for reasons other than the code: {escape('; '.join(differences))}.",
                highlight=False,
            )
        for warning in busy:
            err.print(f"[bold yellow]warning:[/] {escape(warning)}; its timings may be inflated.", highlight=False)
        table = Table(title=f"{escape(str(old_run.get('source')))} → {escape(str(new_run.get('source')))}")
        for column in ("case", "verdict", "baseline ms", "new ms", "change", "band", "p", "note"):
            table.add_column(column, justify="right" if column not in ("case", "verdict", "note") else "left")
        for v in verdicts:
            style = _STYLES.get(v.verdict, "")
            table.add_row(
                escape(v.case),
                f"[{style}]{v.verdict}[/]" if style else v.verdict,
                f"{v.baseline_ms:.3f}" if v.baseline_ms is not None else "",
                f"{v.new_ms:.3f}" if v.new_ms is not None else "",
                f"{v.change:+.1%}" if v.change is not None else "",
                f"±{v.band:.0%}" if v.band is not None else "",
                f"{v.p_value:.2g}" if v.p_value is not None else "",
                escape(v.note),
            )
        out.print(table)
        counts = {name: sum(v.verdict == name for v in verdicts) for name in _STYLES}
        out.print(", ".join(f"{n} {name}" for name, n in counts.items() if n))
    if regressed:
        ctx.exit(REGRESSION_EXIT)
