"""``adapter plan``: choose tensor- and pipeline-parallel degrees for a cluster and print why.

Registered on the main CLI with ``cli.add_command(plan)``; errors are
:class:`adapter.core.errors.AdapterError` and reach ``adapter.cli.main.main``, which prints them as
one paragraph.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from adapter.converter.importer import import_source
from adapter.core.errors import SourceError
from adapter.llm.families import is_causal_lm_source
from adapter.passes.decoder_plan import DecoderShape, plan_decoder
from adapter.passes.pipeline import build_pipeline, run_pipeline
from adapter.passes.sharding_plan import parse_cluster, plan_sharding

__all__ = ["plan", "render_decoder_plan", "render_plan"]

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


def _decoder_config(source: str) -> dict | None:
    """A causal LM's config (a ``config.json`` file, or the folder of one), else None."""
    path = Path(source)
    if path.is_dir() and is_causal_lm_source(source):
        path = path / "config.json"
    if not (path.is_file() and path.suffix == ".json"):
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"Cannot read '{path}' as a model config: {exc}.") from exc
    if not isinstance(config, dict) or not any(str(a).endswith(("ForCausalLM", "LMHeadModel"))
                                               for a in config.get("architectures") or []):  # fmt: skip
        raise SourceError(f"'{path}' is no causal LM config (its architectures name no ...ForCausalLM).")
    return config


def render_decoder_plan(console: Console, data: dict) -> None:
    """Print a decoder plan: the shape, the choice, and per candidate memory, prefill and decode."""
    shape, work, assume = data["shape"], data["workload"], data["assumptions"]
    console.print(
        f"[bold]{escape(data['cluster'])}[/]: {data['devices']} x {escape(data['profile'])}, "
        f"{escape(assume['interconnect'])} {assume['interconnect_bandwidth'] / 1e9:.0f} GB/s per direction, alpha "
        f"{assume['alpha_s'] * 1e6:.0f} us; {assume['compute']} {assume['peak_flops'] / 1e12:.0f} TFLOP/s, "
        f"{assume['memory_bandwidth'] / 1e12:.2f} TB/s, {assume['memory_size'] / 2**30:.0f} GiB",
        highlight=False,
    )
    console.print(
        f"decoder: {escape(shape['family'])}, {shape['params'] / 1e9:.1f} B parameters, {shape['layers']} layers, "
        f"hidden {shape['hidden']}, {shape['heads']} heads / {shape['kv_heads']} KV heads x {shape['head_dim']}, "
        f"MLP {shape['intermediate']}{' gated' if shape['gated'] else ''}, vocabulary {shape['vocab']}; batch "
        f"{work['batch']}, prompt {work['prompt']}, {work['new_tokens']} new tokens",
        highlight=False,
    )
    best = next(c for c in data["candidates"] if (c["tp"], c["pp"], c["weights"]) ==
                (data["tp"], data["pp"], data["weights"]))  # fmt: skip
    console.print(
        f"[bold green]plan: tp={data['tp']} pp={data['pp']}, {data['weights']} weights[/]: prefill "
        f"{best['prefill_ms']:.1f} ms, decode {best['decode_ms']:.2f} ms per token, request "
        f"{best['request_ms'] / 1e3:.2f} s; {_gib(best['memory']['total'])} GiB per rank (weights "
        f"{_gib(best['memory']['weights'])}, KV cache {_gib(best['memory']['kv_cache'])})",
        highlight=False,
    )
    table = Table(title="Candidates (tp x pp = devices)", title_justify="left")
    for col in ("tp", "pp", "weights", "KV heads/rank", "weights GiB", "KV GiB", "GiB/rank", "fits", "prefill ms",
                "tp comm ms", "decode ms/token", "tp comm ms/token", "note"):  # fmt: skip
        table.add_column(col, justify="left" if col == "note" else "right")
    for c in data["candidates"]:
        chosen = c is best or (c["tp"], c["pp"], c["weights"]) == (data["tp"], data["pp"], data["weights"])
        mem = c["memory"]
        heads = f"{c['kv_heads_per_rank']}{'' if c['kv_split'] else ' (whole)'}" if c["kv_heads_per_rank"] else "-"
        table.add_row(
            str(c["tp"]), str(c["pp"]), c["weights"], heads, _gib(mem.get("weights")), _gib(mem.get("kv_cache")),
            _gib(mem.get("total")), "yes" if c["fits"] else "no", _ms(c["prefill_ms"]),
            _ms(c["comm"].get("prefill_tp_ms")), _ms(c["decode_ms"]), _ms(c["comm"].get("decode_tp_ms")),
            "chosen" if chosen else escape(c["reason"]),
            style="bold green" if chosen else "dim" if not c["fits"] else "",
        )  # fmt: skip
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
@click.option("--prompt", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Decoders: prompt tokens per sequence (prefill).")  # fmt: skip
@click.option("--new-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Decoders: generated tokens per sequence (decode).")  # fmt: skip
@click.option("--weights", default=None, help="Decoders: weight format (default: 16-bit, else int8, else int4).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan and every candidate as JSON.")
def plan(source, target, batch, seq, precision, tp, pp, microbatches, heads, trust_source, prompt, new_tokens,
         weights, as_json):  # fmt: skip
    """Choose tensor/pipeline-parallel degrees for a cluster and print the estimate of every candidate.

    A decoder's config.json (or its Hugging Face folder) is planned for generation from its
    shape alone: memory per rank with the KV cache, prefill and per-token decode estimates.

    \b
    Examples:
      adapter plan adapter.zoo:minilm --target 2xnvidia-a100
      adapter plan adapter.zoo:gpt2 --target 4xnvidia-a100-pcie --batch 16 --seq 64 --json
      adapter plan model.onnx --target 8xnvidia-a100 --tp 4 --pp 2 --microbatches 4
      adapter plan benchmarks/configs/falcon-180b.json --target 8xnvidia-h100 --batch 1
    """
    out, err = Console(soft_wrap=True, width=_WIDTH), Console(stderr=True, soft_wrap=True, width=_WIDTH)
    cluster = parse_cluster(target)  # bad text fails before the (slow) export
    config = _decoder_config(source)
    if config is not None:
        result = plan_decoder(DecoderShape.from_config(config), cluster, batch=batch, prompt=prompt,
                              new_tokens=new_tokens, weights=weights, tp=tp, pp=pp)  # fmt: skip
        if as_json:
            click.echo(json.dumps(result.to_json(), indent=2, default=str))
        else:
            render_decoder_plan(out, result.to_json())
        return
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
