"""``adapter shard``: plan tensor/pipeline degrees for a cluster, build the sharded artifact, verify it.

The planner (``passes.sharding_plan``) picks ``--tp``/``--pp`` for the cluster unless they are
given; ``passes.sharding`` writes one graph per rank, cut at its collectives into engines; the
artifact is then run under ``torchrun`` on the example inputs and compared with the unsharded
engine before it is published. ``adapter launch`` runs it afterwards.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from adapter.converter.importer import import_source, prepare_source
from adapter.core.errors import AdapterError
from adapter.llm.families import is_causal_lm_source
from adapter.llm.sharded import build_sharded_llm
from adapter.passes import build_pipeline, run_pipeline
from adapter.passes.decoder_plan import DecoderShape, plan_decoder
from adapter.passes.sharding_plan import parse_cluster, plan_sharding
from adapter.runtime.shard import build_sharded


def _plan(source: str, target: str, batch: int, seq: int, tp: int | None, pp: int | None, microbatches: int | None):
    imported = import_source(prepare_source(source))
    run_pipeline(imported.model, build_pipeline(["canonicalize"]))
    return plan_sharding(imported.model, target, batch=batch, seq=seq, tp=tp, pp=pp, microbatches=microbatches)


def render(console: Console, manifest: dict) -> None:
    """Ranks, weights per rank against the unsharded model, and the verification figures."""
    weights = manifest["weights_bytes"]
    whole = weights["unsharded"] or 1
    table = Table(title=f"Sharded artifact: tp {manifest['tp']} x pp {manifest['pp']}, {manifest['world_size']} ranks")
    for col in ("rank", "stage", "tp", "steps", "collectives", "weights MB", "of unsharded"):
        table.add_column(col, justify="right")
    for spec in manifest["ranks"]:
        size = weights["per_rank"][str(spec["rank"])]
        collectives = sum(1 for s in spec["steps"] if s["op"] != "run")
        table.add_row(
            str(spec["rank"]), str(spec["stage"]), str(spec["tp_rank"]), str(len(spec["steps"])), str(collectives),
            f"{size / 1e6:.2f}", f"{100 * size / whole:.1f}%",
        )  # fmt: skip
    console.print(table)
    ver = manifest.get("verification")
    if ver:
        figures = ", ".join(
            f"{n}: max-abs {f['max_abs']:.2e}, cosine {f['cosine']:.8f}" for n, f in ver["outputs"].items()
        )
        verdict = "[green]verified[/]" if ver["passed"] else "[red]FAILED[/]"
        console.print(
            f"{verdict} under torchrun against {ver['against']} ({figures}; allowed max-abs {ver['atol']:g})."
        )
    else:
        console.print("[yellow]Not verified[/] (--no-verify): run it with `adapter launch`.")


@click.command("shard")
@click.argument("source")
@click.option("-t", "--target", default="2xhost", show_default=True, help="Cluster: <N>x<profile>, e.g. 4xnvidia-a100.")
@click.option("--tp", type=int, default=None, help="Tensor-parallel degree (default: the planner's choice).")
@click.option("--pp", type=int, default=None, help="Pipeline-parallel degree (default: the planner's choice).")
@click.option("--microbatches", type=int, default=None, help="Microbatches of the pipeline schedule.")
@click.option("--batch", type=int, default=8, show_default=True, help="Batch size the planner plans for.")
@click.option("--seq", type=int, default=128, show_default=True, help="Sequence length the planner plans for.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Artifact folder.")
@click.option("--no-verify", is_flag=True, help="Do not run the ranks under torchrun before publishing.")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds a rank may wait on a peer.")
@click.option("--task", type=click.Choice(["auto", "text-generation", "forward"]), default="auto", show_default=True,
              help="text-generation: a causal LM's KV-cache decoder, verified by 32 greedy tokens (auto: for "
              "Hugging Face ...ForCausalLM folders).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def shard(source, target, tp, pp, microbatches, batch, seq, output, no_verify, timeout, task, as_json):
    """Shard SOURCE over a cluster (tensor and pipeline parallel), then verify it under torchrun.

    \b
    Examples:
      adapter shard adapter.zoo:gpt2 --target 2xhost --tp 2 --pp 1
      adapter shard adapter.zoo:minilm --target 4xhost --tp 2 --pp 2
      adapter shard adapter.zoo:minilm --target 8xnvidia-a100 --no-verify
      adapter shard ./qwen2-folder --target 4xhost --tp 2 --pp 2
    """
    err = Console(stderr=True)
    cluster = parse_cluster(target)
    if task == "text-generation" or (task == "auto" and is_causal_lm_source(source)):
        _shard_llm(source, cluster, target, tp, pp, output, no_verify, timeout, as_json, err, batch, seq)
        return
    plan = None
    if tp is None or pp is None or microbatches is None:
        err.print(f"planning for {cluster.count} x {cluster.profile.name} (batch {batch}, seq {seq})")
        plan = _plan(source, target, batch, seq, tp, pp, microbatches).to_json()
        tp, pp, microbatches = plan["tp"], plan["pp"], microbatches or plan["microbatches"]
        err.print(
            f"planned: tp {tp} x pp {pp}, {microbatches} microbatch(es), estimate {plan['estimate']['total_ms']:.3f} ms"
        )
    if tp * pp != cluster.count:
        raise AdapterError(f"--tp {tp} x --pp {pp} is {tp * pp} ranks; the target {target} has {cluster.count}.")
    output = output or Path(f"{source.rpartition(':')[2] or 'model'}-tp{tp}pp{pp}")
    manifest = build_sharded(
        source, output, tp=tp, pp=pp, microbatches=microbatches or 1, target=cluster.profile.name,
        say=lambda m: err.print(m), verify=not no_verify, timeout=timeout, plan=plan,
    )  # fmt: skip
    if as_json:
        sys.stdout.write(json.dumps(manifest, indent=2, default=str) + "\n")
        return
    console = Console()
    render(console, manifest)
    console.print(
        f"Written to {output} in {manifest['seconds']:.1f} s. Run it: adapter launch {output} --nproc {tp * pp}"
    )


def _shard_llm(source, cluster, target, tp, pp, output, no_verify, timeout, as_json, err, batch, seq) -> None:
    plan = None
    if tp is None or pp is None:
        config = json.loads((Path(source) / "config.json").read_text()) if Path(source).is_dir() else None
        if config is None:
            raise click.UsageError(
                "Give --tp and --pp for a factory source (the planner reads a folder's config.json)."
            )
        plan = plan_decoder(DecoderShape.from_config(config), cluster, batch=batch, prompt=seq, tp=tp, pp=pp)
        tp, pp = plan.tp, plan.pp
        best = plan.chosen
        err.print(f"planned for {cluster.count} x {cluster.profile.name}: tp {tp} x pp {pp} ({plan.weights} weights "
                  f"planned; prefill {best.prefill_ms:.1f} ms, decode {best.decode_ms:.2f} ms per token)")  # fmt: skip
    if tp * pp != cluster.count:
        raise AdapterError(f"--tp {tp} x --pp {pp} is {tp * pp} ranks; the target {target} has {cluster.count}.")
    output = output or Path(f"{Path(source).name or 'decoder'}-tp{tp}pp{pp}")
    manifest = build_sharded_llm(source, output, tp=tp, pp=pp, target=cluster.profile.name,
                                 say=lambda m: err.print(m), verify=False if no_verify else None,
                                 timeout=timeout, plan=plan.to_json() if plan else None)  # fmt: skip
    if as_json:
        sys.stdout.write(json.dumps(manifest, indent=2, default=str) + "\n")
        return
    console = Console()
    render_llm(console, manifest)
    console.print(
        f"Written to {output} in {manifest['seconds']:.1f} s. Generate: adapter launch {output} --nproc {tp * pp} "
        "generate --prompt-ids 1,2,3 --max-new-tokens 32"
    )


def render_llm(console: Console, manifest: dict) -> None:
    """Ranks with their weights and KV heads, what tensor parallelism split or kept whole, the verification."""
    weights = manifest["weights_bytes"]
    whole = weights["unsharded"] or 1
    table = Table(title=f"Sharded decoder: tp {manifest['tp']} x pp {manifest['pp']}, {manifest['world_size']} ranks")
    for col in ("rank", "stage", "tp", "layers' caches", "collectives", "weights MB", "of unsharded"):
        table.add_column(col, justify="right")
    for spec in manifest["ranks"]:
        size = weights["per_rank"][str(spec["rank"])]
        table.add_row(
            str(spec["rank"]), str(spec["stage"]), str(spec["tp_rank"]), str(len(spec.get("cache", [])) // 2),
            str(sum(1 for s in spec["steps"] if s["op"] != "run")), f"{size / 1e6:.2f}", f"{100 * size / whole:.1f}%",
        )  # fmt: skip
    console.print(table)
    if manifest.get("peak_rss_bytes"):
        console.print(
            f"converting process: peak RSS {manifest['peak_rss_bytes'] / 2**30:.2f} GiB for "
            f"{whole / 2**30:.2f} GiB of weights (written rank by rank, tensor by tensor)"
        )
    split = manifest.get("tensor_parallel")
    if split:
        console.print(
            f"tensor parallel: {len(split['column_parallel'])} column / {len(split['row_parallel'])} row products, "
            f"{len(split['vocab_parallel_embeddings'])} embedding(s) by vocabulary, KV cache per rank for "
            f"{len(split['per_rank_inputs'])} past tensors"
        )
        for name, why in split["replicated"].items():
            module = split.get("modules", {}).get(name)
            console.print(f"  kept whole: {escape(module + ' ' if module else '')}({name}; {escape(why)})")
    ver = manifest.get("verification") or {}
    if ver.get("passed") is not None:
        verdict = "[green]verified[/]" if ver["passed"] else "[red]FAILED[/]"
        console.print(
            f"{verdict} under torchrun: {ver['steps']} greedy tokens x {len(ver['prompts'])} prompts equal to "
            f"{ver['against']}; first-step logits max-abs {ver['first_logits_max_abs']:.2e}."
        )
        eager = ver.get("eager")
        if eager:
            console.print(
                f"the unsharded engine against eager PyTorch: prefill logits max-abs {eager['prefill']['max_abs']:.1e}, "
                f"{eager['greedy']['steps']} greedy tokens {'equal' if eager['greedy']['equal'] else 'DIFFER'}."
            )
    else:
        console.print(f"[yellow]Not verified[/]: {escape(ver.get('skipped', 'no verification'))}.")
