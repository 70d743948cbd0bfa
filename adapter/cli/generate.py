"""``adapter generate``, and the report of a causal-LM engine.

Loaded by the main CLI when invoked; it imports no torch (generating needs none, and torch
holds ~0.3 GB resident). Errors are
:class:`adapter.core.errors.AdapterError` and reach ``adapter.cli.main.main``, which prints
them as one paragraph.
"""

from __future__ import annotations

__all__ = ["generate", "render_llm_manifest", "parse_ids"]

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from adapter.cli.console import err, out
from adapter.core.errors import InputMismatchError
from adapter.llm.engine import LLMEngine
from adapter.llm.generate import Sampling


def parse_ids(text: str) -> list[int]:
    """``1,2,3`` (or spaces) to token ids."""
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError as exc:
        raise InputMismatchError(
            f"--prompt-ids '{text}' is not a list of integers.", "Write token ids as 1,2,3."
        ) from exc
    if not ids:
        raise InputMismatchError("--prompt-ids is empty.", "Write token ids as 1,2,3.")
    return ids


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def render_llm_manifest(console: Console, manifest: dict[str, Any], seconds: float | None = None) -> None:
    """Print a generation engine's report: backend, weights, verification, speed, candidates."""
    src, backend, layout = manifest["source"], manifest["backend"], manifest["layout"]
    head = Table.grid(padding=(0, 2))
    head.add_row("source", f"{escape(src['spec'])} ({src['kind']}, {src['family']})")
    head.add_row(
        "decoder",
        f"{layout['num_layers']} layers, {layout['kv_heads']} KV heads x {layout['head_dim']}, "
        f"vocab {layout['vocab_size']}, {layout['max_positions']} positions",
    )
    head.add_row("backend", f"{backend['name']} {backend['version']}, {backend['config'].get('threads', '?')} threads")
    weights = manifest["weights"]
    config = backend["config"]
    if weights in ("int4", "int8"):
        weights += f" weight-only, group {config.get('block_size')}, {'symmetric' if config.get('symmetric') else 'asymmetric'}"
    head.add_row("weights", weights)
    ver = manifest["verification"]
    if "greedy" in ver:
        text = (
            f"prefill logits max-abs {ver['prefill']['max_abs']:.1e} (cos {ver['prefill']['cosine']:.6f}), "
            f"{ver['decode_steps']} decode steps max-abs {ver['decode']['max_abs']:.1e}; greedy tokens over "
            f"{ver['greedy']['steps']} steps {'equal' if ver['greedy']['equal'] else 'DIFFER'} to eager"
        )
    else:
        text = (
            f"next-token KL to eager FP32 {ver['kl_mean']:.2e} (max {ver['kl_max']:.2e}, budget {ver['kl_budget']}), "
            f"greedy agreement {ver['greedy_agreement']:.1%} over {ver['positions']} positions"
        )
    head.add_row("verified", text)
    if seconds is not None:
        head.add_row("converted in", f"{seconds:.1f} s")
    console.print(head)
    table = Table(title="candidates (decode speed on this machine, short run)")
    for column in ("backend", "chosen", "time to first token ms", "decode tok/s", "result"):
        table.add_column(column)
    for cand in backend["candidates"]:
        speed = cand.get("speed") or {}
        result = "verified" if "verification" in cand else escape(cand.get("error", ""))[:80]
        table.add_row(
            cand["name"], "yes" if cand.get("chosen") else "", _fmt(speed.get("ttft_ms")),
            _fmt(speed.get("decode_tokens_per_s"), 4), result,
        )  # fmt: skip
    console.print(table)


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--prompt", "prompts", multiple=True, help="Prompt text (needs the tokenizer of the source). Repeatable: a batch."
)
@click.option("--prompt-ids", "prompt_ids", multiple=True, help="Prompt token ids, e.g. 1,2,3. Repeatable: a batch.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="0: no top-k cut.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Sampling seed (the same seed repeats a sampled run).")
@click.option("--stream", is_flag=True, help="Print tokens as they are generated (one prompt).")
@click.option("--ignore-eos", is_flag=True, help="Generate max-new-tokens even past end-of-sequence.")
@click.option("--json", "as_json", is_flag=True, help="Print tokens, texts and figures as JSON.")
def generate(
    artifact, prompts, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stream, ignore_eos, as_json
):
    """Generate text with a causal-LM engine ARTIFACT (from `adapter convert` of a causal LM).

    Reports time to first token, decode tokens/s and peak memory.

    \b
    Examples:
      adapter generate tinyllama-host --prompt-ids 1,450,4996 --max-new-tokens 64
      adapter generate qwen-host --prompt "The capital of France is" --stream
      adapter generate qwen-host --prompt "Once" --temperature 0.8 --top-p 0.9 --seed 1 --json
    """
    if bool(prompts) == bool(prompt_ids):
        raise InputMismatchError("Give either --prompt or --prompt-ids (one or more of one kind).")
    engine = LLMEngine.load(artifact)
    ids = [parse_ids(p) for p in prompt_ids] if prompt_ids else engine.encode(list(prompts))
    if stream and len(ids) > 1:
        raise InputMismatchError("--stream prints one prompt's tokens; give one prompt.")

    def show(_step: int, tokens: list[int]) -> None:
        piece = engine.decode([tokens[0]]) if engine.tokenizer is not None else f"{tokens[0]} "
        click.echo(piece, nl=False)

    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    result = engine.generate(
        ids, max_new_tokens=max_new_tokens, sampling=sampling, stop_at_eos=not ignore_eos,
        on_tokens=show if stream and not as_json else None,
    )  # fmt: skip
    if stream and not as_json:
        click.echo()
    texts = [engine.decode(t) for t in result.tokens]
    if as_json:
        out.print_json(json.dumps({**result.to_json(), "texts": texts, "backend": engine.backend}))
        return
    if not stream:
        for row, tokens in enumerate(result.tokens):
            shown = texts[row] if texts[row] is not None else " ".join(map(str, tokens))
            out.print(f"[bold]{row}[/]: {escape(shown)}")
    err.print(
        f"{engine.backend}: time to first token {result.ttft_ms:.1f} ms, decode {result.decode_tokens_per_s:.1f} "
        f"tokens/s over {result.decode_steps} steps x {len(ids)} rows, RSS {result.rss_mb:.0f} MiB at the end "
        f"(peak {result.peak_rss_mb:.0f} MiB, loading included)",
        highlight=False,
    )
