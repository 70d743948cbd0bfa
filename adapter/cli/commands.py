"""The converter's commands: ``convert``, ``check``, ``run``, ``targets`` (``probe``), ``ops``, ``info``.

Loaded by :mod:`adapter.cli.main` when one of them is invoked (they import torch through
the converter). Errors are :class:`adapter.core.errors.AdapterError`, printed by
``adapter.cli.main.main`` as one paragraph.
"""

from __future__ import annotations

__all__ = ["convert", "check", "run", "targets", "ops", "info", "convert_llm"]

import json
import os
import zipfile
from pathlib import Path

import click

from adapter.backends import BACKENDS
from adapter.cli.console import err, out
from adapter.cli.generate import render_llm_manifest
from adapter.cli.report import render_check, render_manifest, render_outputs, render_targets
from adapter.converter.api import ConvertOptions, load
from adapter.converter.api import convert as run_convert
from adapter.converter.check import check as run_check
from adapter.converter.coverage import coverage, render
from adapter.converter.precision import CHOICES, PrecisionOptions
from adapter.core.artifact import validate
from adapter.core.errors import AdapterError, InputMismatchError, SourceError
from adapter.core.verify import Tolerance
from adapter.llm.convert import WEIGHTS, LLMOptions, convert_causal_lm
from adapter.llm.families import is_causal_lm_source
from adapter.profiles import list_profiles, load_profile
from adapter.profiles.probe import probe_host


class _BackendName(click.Choice):
    """A registered backend's name, read from ``adapter.backends.BACKENDS`` when the command
    line is parsed (so a backend registered at run time is a valid choice)."""

    def __init__(self) -> None:
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(BACKENDS)

    @choices.setter
    def choices(self, _value) -> None:
        pass


def _print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.command()
@click.argument("source")
@click.option(
    "-t",
    "--target",
    default="host",
    show_default=True,
    help="Target profile name (see `adapter targets`) or a profile .toml file.",
)
@click.option("-b", "--backend", default=None, help="Backend; default: the target profile's default backend.")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Artifact folder; default: ./<model>-<target>.",
)
@click.option(
    "--dynamic",
    multiple=True,
    metavar="INPUT:AXIS=NAME[MIN..MAX],...",
    help="Dynamic axes, e.g. input_ids:0=batch,1=seq[1..512]. Repeatable.",
)
@click.option(
    "--passes",
    default=None,
    help="Comma-separated passes or pipelines (default: the profile's, else canonicalize; 'none' for no passes).",
)
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Absolute verification tolerance.")
@click.option(
    "--rtol", type=float, default=1e-5, show_default=True, help="Tolerance relative to the largest reference value."
)
@click.option(
    "--min-cosine", type=float, default=0.99999, show_default=True, help="Lowest cosine similarity per output."
)
@click.option(
    "--verify-samples",
    type=int,
    default=2,
    show_default=True,
    help="Random verification cases besides the example inputs.",
)
@click.option(
    "--precision",
    type=click.Choice(CHOICES),
    default="default",
    show_default=True,
    help="Precision of the engine: default takes BF16 where the CPU computes it and it stays near-lossless "
    "(cos>=0.9999, max_rel<=0.02 against FP32) and is faster, else FP32; fp32 is exact; auto searches the "
    "modes the target supports for the fastest within --accuracy-budget.",
)
@click.option("--accuracy-budget", default=None, help="e.g. 'cos>=0.999', 'cos_min>=0.98,max_abs<=1e-2', 'top1>=0.99'.")
@click.option(
    "--calib", type=click.Path(path_type=Path), default=None, help="Calibration .npz (a feed) or a folder of them."
)
@click.option(
    "--calib-text",
    type=click.Path(path_type=Path),
    default=None,
    help="Calibration text, one sample per line, tokenized with the model's tokenizer.",
)
@click.option("--precision-plan", type=click.Path(path_type=Path), default=None, help="Apply a saved plan.json as is.")
@click.option(
    "--calib-method",
    type=click.Choice(["minmax", "entropy", "percentile"]),
    default="minmax",
    show_default=True,
    help="INT8 static calibration method.",
)
@click.option(
    "--trust-source", is_flag=True, help="Allow a .pt2 that unpickles objects. Only for files you made yourself."
)
@click.option("--no-cache", is_flag=True, help="Rebuild even if a cached engine matches.")
@click.option("--no-bench", is_flag=True, help="Skip the latency figures in the report.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON instead of tables.")
@click.option(
    "--task",
    type=click.Choice(["auto", "text-generation", "forward"]),
    default="auto",
    show_default=True,
    help="text-generation: a causal LM with a KV cache for `adapter generate`; auto: that for a Hugging Face "
    "folder of a ...ForCausalLM, one forward pass otherwise.",
)
@click.option(
    "--weights",
    type=click.Choice(WEIGHTS),
    default=None,
    help="Generation engines: fp32, bf16, or weight-only int8/int4 (implies --task text-generation).",
)
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default=None, help="INT4 weight group size.")
@click.option("--symmetric/--asymmetric", default=None, help="INT4/INT8 weights without/with zero points.")
@click.option(
    "--kl-budget",
    type=click.FloatRange(0, min_open=True),
    default=0.05,
    show_default=True,
    help="Generation engines with reduced weights: the largest mean next-token KL divergence to FP32.",
)
def convert(
    source,
    target,
    backend,
    output,
    dynamic,
    passes,
    atol,
    rtol,
    min_cosine,
    verify_samples,
    precision,
    accuracy_budget,
    calib,
    calib_text,
    precision_plan,
    calib_method,
    trust_source,
    no_cache,
    no_bench,
    as_json,
    task,
    weights,
    group_size,
    symmetric,
    kl_budget,
):
    """Convert SOURCE to a verified engine for a target.

    SOURCE is a factory (path/to/file.py:make_model or package.module:attr,
    returning (module, example_inputs[, dynamic])), a local Hugging Face folder
    (safetensors), a .pt2 ExportedProgram or an .onnx file. A factory is Python code:
    it runs with your rights, so only name files you trust. Pickled checkpoints
    (.pt, .pth, .bin) are refused.

    \b
    Examples:
      adapter convert adapter.zoo:minilm --target host
      adapter convert model.py:make_model -t intel-xeon-spr --dynamic x:0=batch -o out/
      adapter convert model.onnx --json
      adapter convert adapter.zoo:minilm --precision auto --accuracy-budget 'cos>=0.995' --calib-text s.txt
      adapter convert ./TinyLlama-folder --weights int4 --group-size 32   (then: adapter generate)
    """
    if task == "text-generation" or weights or (task == "auto" and is_causal_lm_source(source)):
        group = int(group_size) if group_size else None
        convert_llm(source, output, target, backend, weights, group, symmetric, kl_budget, no_bench, as_json)
        return
    options = ConvertOptions(
        target=target,
        backend=backend,
        dynamic=tuple(dynamic),
        passes=tuple(p.strip() for p in passes.split(",") if p.strip()) if passes is not None else None,
        tolerance=Tolerance(atol=atol, rtol=rtol, min_cosine=min_cosine),
        verify_samples=verify_samples,
        precision=PrecisionOptions(
            mode=precision,
            budget=accuracy_budget,
            calib=str(calib) if calib else None,
            calib_text=str(calib_text) if calib_text else None,
            plan=str(precision_plan) if precision_plan else None,
            calibrate_method=calib_method,
        ),
        trust_source=trust_source,
        benchmark=not no_bench,
        use_cache=not no_cache,
    )
    with err.status("converting…") as status:
        result = run_convert(source, output, options, progress=lambda s: status.update(f"{s}…"))
    if as_json:
        _print_json(
            {
                "artifact": str(result.path),
                "cache_hit": result.cache_hit,
                "seconds": result.seconds,
                "manifest": result.manifest,
            }
        )
        return
    verdict = "[bold green]cache hit[/]" if result.cache_hit else "[bold green]converted and verified[/]"
    out.print(f"{verdict}: {result.path}")
    render_manifest(
        out, result.manifest, cache_note=result.cache_note if result.cache_hit else "", seconds=result.seconds
    )


@click.command()
@click.argument("source")
@click.option("-t", "--target", default="host", show_default=True, help="Target profile name or .toml file.")
@click.option(
    "-b", "--backend", default=None, help="Backend to check; default: the profile's (auto: every listed one)."
)
@click.option("--dynamic", multiple=True, metavar="INPUT:AXIS=NAME[MIN..MAX],...", help="Dynamic axes, as for convert.")
@click.option("--trust-source", is_flag=True, help="Allow a .pt2 that unpickles objects (only files you made).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def check(ctx, source, target, backend, dynamic, trust_source, as_json):
    """Pre-flight: list every node each candidate backend cannot run, with fixes.

    Nothing is compiled. Exits 4 when the chosen backend (with auto: every
    candidate) cannot run the model.

    \b
    Examples:
      adapter check adapter.zoo:minilm
      adapter check model.onnx --target intel-xeon-spr --backend openvino --json
    """
    with err.status("checking…") as status:
        report = run_check(
            source, target, backend, tuple(dynamic), trust_source, progress=lambda s: status.update(f"{s}…")
        )
    data = report.to_json()
    if as_json:
        _print_json(data)
    else:
        render_check(out, data)
    if not report.ok:
        ctx.exit(4)


def _load_npz(path: Path) -> dict:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError as exc:
        raise SourceError(f"Inputs file '{path}' does not exist.") from exc
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise SourceError(
            f"'{path}' is not a readable .npz of arrays ({exc}).",
            "Save inputs with numpy.savez(path, name=array, ...); object arrays are refused.",
        ) from exc


def _non_finite(arrays: dict) -> str:
    """'name (n NaN, m Inf of total)' for every floating array holding NaN or Inf."""
    import numpy as np

    found = []
    for name, value in arrays.items():
        value = np.asarray(value)
        if value.dtype.kind in "fc":
            nan, inf = int(np.isnan(value).sum()), int(np.isinf(value).sum())
            if nan or inf:
                found.append(f"'{name}' ({nan} NaN, {inf} Inf of {value.size})")
    return ", ".join(found)


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "-i",
    "--inputs",
    "inputs_path",
    type=click.Path(path_type=Path),
    required=True,
    help=".npz file with one array per input name.",
)
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), default=None, help="Write the outputs to this .npz file."
)
@click.option("--json", "as_json", is_flag=True, help="Print output shapes and statistics as JSON.")
@click.option(
    "--check-finite",
    is_flag=True,
    help="Refuse inputs, and report outputs, holding NaN or Inf (outputs are not saved).",
)
def run(artifact, inputs_path, output, as_json, check_finite):
    """Run an engine ARTIFACT on inputs from an .npz file.

    \b
    Example:
      adapter run minilm-host --inputs x.npz --output y.npz
    """
    import numpy as np

    engine = load(artifact)
    feed = _load_npz(inputs_path)
    if check_finite and (bad := _non_finite(feed)):
        raise InputMismatchError(f"Input(s) hold non-finite values: {bad}.", "Clean the inputs or drop --check-finite.")
    results = engine.run(feed)
    if check_finite and (bad := _non_finite(results)):
        raise AdapterError(
            f"The engine produced non-finite output(s) from finite inputs: {bad}; nothing was saved.",
            "Check the inputs' range, or the engine's precision (`adapter info`).",
        )
    if output is not None:
        tmp = output.with_name(f".{output.name}.tmp.npz")
        np.savez(tmp, **results)
        os.replace(tmp, output)
    if as_json:
        _print_json(
            {
                name: {
                    "shape": list(v.shape),
                    "dtype": str(v.dtype),
                    "min": float(v.min()),
                    "max": float(v.max()),
                    "mean": float(v.mean()),
                }
                for name, v in results.items()
            }
        )
        return
    render_outputs(out, results)
    if output is not None:
        out.print(f"Saved to {output}")


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
@click.pass_context
def targets(ctx, as_json):
    """List target profiles (`adapter targets probe` measures this machine).

    \b
    Examples:
      adapter targets
      adapter targets probe --force
    """
    if ctx.invoked_subcommand is not None:
        return
    rows = [load_profile(name).to_dict() for name in list_profiles()]
    if as_json:
        _print_json(rows)
    else:
        render_targets(out, rows)


@targets.command()
@click.option("--force", is_flag=True, help="Measure again even if a cached probe exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the measured profile as JSON.")
def probe(force, as_json):
    """Measure this machine: matmul FP32/BF16 peaks and copy bandwidth (cached).

    \b
    Example:
      adapter targets probe --json
    """
    with err.status("measuring this machine…"):
        profile = probe_host(force=force)
    if as_json:
        _print_json(profile.to_dict())
    else:
        render_targets(out, [profile.to_dict()])


@click.command()
@click.option(
    "-b",
    "--backend",
    type=_BackendName(),
    default=None,
    help="Show one backend's column only (default: every registered backend).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the matrix and coverage shares as JSON.")
def ops(backend, as_json):
    """Op library: the op × backend support matrix and coverage over the test zoo.

    ONNX Runtime and OpenVINO are asked live (their supports()); TVM, TensorRT and
    MIGraphX come from their documented op lists. Exports the zoo models first.

    \b
    Examples:
      adapter ops
      adapter ops --backend tensorrt --json
    """
    names = (backend,) if backend else None
    with err.status("exporting the zoo and asking the backends…"):
        data = coverage(backends=names) if names else coverage()
    if as_json:
        _print_json(data)
    else:
        render(out, data, backend)


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def info(artifact, as_json):
    """Show an engine ARTIFACT's manifest (checksums verified).

    \b
    Example:
      adapter info minilm-host
    """
    manifest = validate(artifact)
    if as_json:
        _print_json(manifest)
    elif manifest.get("kind") == "causal-lm":
        render_llm_manifest(out, manifest)
    else:
        render_manifest(out, manifest)


def convert_llm(source, output, target, backend, weights, group_size, symmetric, kl_budget, no_bench, as_json):
    """The ``adapter convert`` path for causal LMs (called by the convert command)."""
    options = LLMOptions(
        target=target,
        backend=backend,
        weights=weights or "fp32",
        group_size=group_size,
        symmetric=symmetric,
        kl_budget=kl_budget,
        benchmark=not no_bench,
    )
    with err.status("converting…") as status:
        result = convert_causal_lm(source, output, options, progress=lambda s: status.update(f"{s}…"))
    if as_json:
        out.print_json(
            json.dumps({"artifact": str(result.path), "seconds": result.seconds, "manifest": result.manifest})
        )
        return
    out.print(f"[bold green]converted and verified[/]: {result.path}")
    render_llm_manifest(out, result.manifest, result.seconds)
