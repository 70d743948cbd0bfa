"""Sharding planner for generation: tensor/pipeline degrees of a decoder from its config alone.

A decoder's cost is known from its shape (``config.json``: layers, hidden width, query and KV
heads, MLP width, vocabulary), so a Falcon-180B or a 70B-class model is planned without
weights and without an export. For each ``(tp, pp)`` with ``tp * pp`` devices, per rank:

* **memory** = weights (the largest stage's layers ``/ tp``; KV projections ``/ tp`` only when
  the KV heads divide by ``tp``, else whole on every rank; the embedding on the first stage
  and the LM head on the last, both split by vocabulary) + the **KV cache** at
  ``batch x context`` for the stage's layers (``kv_heads / tp`` heads, or all of them) +
  prefill activations (four tensors of the widest layer output at ``batch x prompt``: fused
  attention keeps no ``prompt x prompt`` scores, the logits only the last position) + a fixed
  workspace and :data:`WORKSPACE_SLACK`; it must be at most the profile's ``memory_size``;
* **prefill** (the prompt, ``batch x prompt`` tokens): per stage the roofline of its FLOPs
  (``2 x params`` per token plus causal attention) ``/ tp`` against its weight bytes, plus two
  ring all-reduces per layer of ``batch x prompt x hidden`` over the profile's interconnect
  (``alpha + 2 (tp-1)/tp x bytes / bandwidth``) and one send per stage boundary; stages run
  as a GPipe schedule over the batch's microbatches (the fastest divisor);
* **decode** (one token per sequence): per stage the roofline of reading its weights and its
  KV cache at the mean context against ``2 x params x batch`` FLOPs, plus two all-reduces per
  layer of ``batch x hidden`` (small: the link's latency ``alpha`` dominates) and a send per
  boundary; the stages of one token run one after another, so the per-token time is their sum.

The request time ``prefill + new_tokens x decode`` ranks the candidates; the weight format is
the widest of ``--weights`` (default: the profile's 16-bit format, then weight-only INT8, then
INT4) for which some candidate fits. A slow link (PCIe) makes the per-layer all-reduces of
prefill expensive, which moves the choice from tensor towards pipeline parallelism.
"""

from __future__ import annotations

__all__ = ["DecoderShape", "DecoderPlan", "WEIGHT_BYTES", "plan_decoder"]

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from adapter.core.errors import AdapterError
from adapter.passes.sharding_plan import WORKSPACE_BYTES, WORKSPACE_SLACK, Cluster, parse_cluster

WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0 + 2 / 128, "int4": 0.5 + 2 / 128}
"""Bytes per weight: weight-only INT8/INT4 carry one 16-bit scale per group of 128."""
_GATED = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "mixtral"}


def _first(config: dict[str, Any], *names: str, default: Any = None) -> Any:
    return next((config[n] for n in names if config.get(n) is not None), default)


@dataclass(frozen=True)
class DecoderShape:
    """What the cost of a decoder depends on, read from its ``config.json``."""

    family: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated: bool
    tied: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DecoderShape:
        """Llama/Mistral/Qwen/Phi-3/Gemma (``hidden_size`` ...), GPT-2 (``n_embd`` ...), Falcon.

        Raises:
            AdapterError: A size the plan needs is missing.
        """
        family = str(config.get("model_type") or "decoder")
        hidden = _first(config, "hidden_size", "n_embd", "d_model")
        layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
        heads = _first(config, "num_attention_heads", "n_head", "num_heads")
        vocab = _first(config, "vocab_size")
        missing = [n for n, v in (("hidden size", hidden), ("layers", layers), ("heads", heads), ("vocab", vocab))
                   if not isinstance(v, int) or v < 1]  # fmt: skip
        if missing:
            raise AdapterError(f"The config has no {', '.join(missing)} (model_type '{family}').")
        if family == "falcon":
            kv = config.get("num_kv_heads") if config.get("new_decoder_architecture") else (
                1 if config.get("multi_query", True) else heads)  # fmt: skip
        else:
            kv = _first(config, "num_key_value_heads", "num_kv_heads", default=heads)
        intermediate = _first(config, "intermediate_size", "n_inner", "ffn_hidden_size", default=4 * hidden)
        tied = bool(config.get("tie_word_embeddings", family in ("gpt2", "falcon", "gemma")))
        return cls(family, int(layers), int(hidden), int(heads), int(kv or heads),
                   int(_first(config, "head_dim", default=hidden // heads)), int(intermediate), int(vocab),
                   family in _GATED, tied)  # fmt: skip

    def attention_params(self) -> tuple[int, int]:
        """(query + output projections, key + value projections) of one layer."""
        q_o = 2 * self.hidden * self.heads * self.head_dim
        return q_o, 2 * self.hidden * self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        q_o, kv = self.attention_params()
        return q_o + kv + (3 if self.gated else 2) * self.hidden * self.intermediate + 4 * self.hidden

    def params(self) -> int:
        return self.layers * self.layer_params() + self.vocab * self.hidden * (1 if self.tied else 2)


@dataclass
class DecoderCandidate:
    """One ``(tp, pp)``: memory per rank and the prefill / decode estimates."""

    tp: int
    pp: int
    weights: str
    fits: bool
    reason: str = ""
    kv_heads_per_rank: int = 0
    kv_split: bool = False
    microbatches: int = 1
    memory: dict[str, float] = field(default_factory=dict)
    """Bytes per rank (the largest stage): ``weights``, ``kv_cache``, ``activations``, ``workspace``, ``total``."""
    prefill_ms: float | None = None
    decode_ms: float | None = None
    """Per generated token (every sequence of the batch advances one token)."""
    request_ms: float | None = None
    comm: dict[str, float] = field(default_factory=dict)
    """Milliseconds of collectives and sends in ``prefill`` and per ``decode`` token."""


@dataclass
class DecoderPlan:
    """The chosen candidate and every candidate considered."""

    cluster: str
    profile: str
    devices: int
    shape: dict[str, Any]
    workload: dict[str, int]
    tp: int
    pp: int
    weights: str
    candidates: list[DecoderCandidate]
    assumptions: dict[str, Any]

    @property
    def chosen(self) -> DecoderCandidate:
        return next(c for c in self.candidates if (c.tp, c.pp, c.weights) == (self.tp, self.pp, self.weights))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _all_reduce_s(nbytes: float, tp: int, cluster: Cluster) -> float:
    if tp == 1:
        return 0.0
    return cluster.alpha + 2 * (tp - 1) / tp * nbytes / cluster.profile.interconnect.bandwidth


def _send_s(nbytes: float, cluster: Cluster) -> float:
    return cluster.alpha + nbytes / cluster.profile.interconnect.bandwidth


def _evaluate(shape: DecoderShape, cluster: Cluster, tp: int, pp: int, weights: str, compute: str,
              batch: int, prompt: int, new_tokens: int) -> DecoderCandidate:  # fmt: skip
    cand = DecoderCandidate(tp, pp, weights, False)
    if shape.heads % tp:
        cand.reason = f"{shape.heads} heads do not split {tp} ways"
        return cand
    if pp > shape.layers:
        cand.reason = f"{pp} stages for {shape.layers} layers"
        return cand
    wbytes, act = WEIGHT_BYTES[weights], 2.0 if compute in ("bf16", "fp16") else 4.0
    cand.kv_split = shape.kv_heads % tp == 0
    cand.kv_heads_per_rank = shape.kv_heads // tp if cand.kv_split else shape.kv_heads
    q_o, kv = shape.attention_params()
    mlp = (3 if shape.gated else 2) * shape.hidden * shape.intermediate
    layer_rank = q_o / tp + (kv / tp if cand.kv_split else kv) + mlp / tp + 4 * shape.hidden
    per_stage = math.ceil(shape.layers / pp)
    table = shape.vocab * shape.hidden / (tp if shape.vocab % tp == 0 else 1)
    ends = table * (1 if shape.tied and pp == 1 else 2) if pp == 1 else table  # first or last stage
    weight_bytes = (per_stage * layer_rank + ends) * wbytes
    context = prompt + new_tokens
    kv_layer = 2 * batch * context * cand.kv_heads_per_rank * shape.head_dim * act
    kv_bytes = per_stage * kv_layer
    # fused attention (no prompt x prompt scores kept) and last-position logits: the MLP is the widest
    widest = max(shape.hidden, shape.intermediate * (2 if shape.gated else 1) / tp)
    act_bytes = 4 * batch * prompt * widest * act + batch * shape.vocab / tp * 4
    total = weight_bytes + kv_bytes + act_bytes
    workspace = WORKSPACE_BYTES + WORKSPACE_SLACK * total
    cand.memory = {"weights": weight_bytes, "kv_cache": kv_bytes, "activations": act_bytes, "workspace": workspace,
                   "total": total + workspace}  # fmt: skip
    if cand.memory["total"] > cluster.memory_size:
        cand.reason = f"{cand.memory['total'] / 2**30:.1f} GiB per rank > {cluster.memory_size / 2**30:.1f} GiB"
        return cand
    cand.fits = True
    peak, bandwidth = cluster.peak(compute), cluster.memory_bandwidth
    attn_ctx = shape.heads * shape.head_dim / tp
    # prefill: GPipe over microbatches of the batch
    best = None
    for m in (d for d in range(1, batch + 1) if batch % d == 0):
        tokens = batch // m * prompt
        flops = per_stage * (2 * layer_rank * tokens + 2 * 2 * (batch // m) * prompt * prompt / 2 * attn_ctx)
        stage = max(flops / peak, per_stage * layer_rank * wbytes / bandwidth)
        comm = per_stage * 2 * _all_reduce_s(tokens * shape.hidden * act, tp, cluster)
        send = _send_s(tokens * shape.hidden * act, cluster) if pp > 1 else 0.0
        time_s = (m + pp - 1) * (stage + comm + send)
        if best is None or time_s < best[0]:
            best = (time_s, m, (m + pp - 1) * comm, (m + pp - 1) * send)
    cand.prefill_ms, cand.microbatches = best[0] * 1e3, best[1]
    # decode: one token per sequence at the mean context; the stages run one after another
    mean = prompt + new_tokens / 2
    flops = per_stage * (2 * layer_rank * batch + 4 * batch * mean * attn_ctx)
    read = per_stage * (layer_rank * wbytes + 2 * batch * mean * cand.kv_heads_per_rank * shape.head_dim * act)
    stage = max(flops / peak, read / bandwidth) + table * wbytes / bandwidth / pp
    comm = per_stage * 2 * _all_reduce_s(batch * shape.hidden * act, tp, cluster)
    send = _send_s(batch * shape.hidden * act, cluster) if pp > 1 else 0.0
    cand.decode_ms = (pp * (stage + comm) + (pp - 1) * send) * 1e3
    cand.request_ms = cand.prefill_ms + new_tokens * cand.decode_ms
    cand.comm = {"prefill_tp_ms": best[2] * 1e3, "prefill_pp_ms": best[3] * 1e3, "decode_tp_ms": pp * comm * 1e3,
                 "decode_pp_ms": (pp - 1) * send * 1e3}  # fmt: skip
    return cand


def plan_decoder(
    shape: DecoderShape,
    target: str | Cluster,
    *,
    batch: int = 1,
    prompt: int = 2048,
    new_tokens: int = 256,
    weights: str | None = None,
    tp: int | None = None,
    pp: int | None = None,
) -> DecoderPlan:
    """Choose ``(tp, pp)`` and the weight format for generating with ``shape`` on a cluster.

    Raises:
        AdapterError: Bad figures, a forced degree that does not divide the devices, or nothing fits.
    """
    cluster = target if isinstance(target, Cluster) else parse_cluster(target)
    for name, value in (("batch", batch), ("prompt", prompt), ("new_tokens", new_tokens)):
        if not isinstance(value, int) or value < 1:
            raise AdapterError(f"{name} must be a positive integer, got {value!r}.")
    n = cluster.count
    compute = next((p for p in ("bf16", "fp16", "fp32") if p in cluster.profile.precisions), "fp32")
    formats = [weights] if weights else [compute, "int8", "int4"]
    unknown = [f for f in formats if f not in WEIGHT_BYTES]
    if unknown:
        raise AdapterError(f"Unknown weight format '{unknown[0]}'.", f"Use one of {', '.join(WEIGHT_BYTES)}.")
    pairs = [(t, n // t) for t in range(1, n + 1) if n % t == 0]
    if tp is not None or pp is not None:
        pairs = [(t, p) for t, p in pairs if (tp is None or t == tp) and (pp is None or p == pp)]
        if not pairs:
            raise AdapterError(f"--tp {tp} x --pp {pp} does not make {n} devices.")
    candidates: list[DecoderCandidate] = []
    chosen = None
    for fmt in formats:
        round_ = [_evaluate(shape, cluster, t, p, fmt, compute, batch, prompt, new_tokens) for t, p in pairs]
        candidates += round_
        fitting = [c for c in round_ if c.fits]
        if fitting:
            chosen = min(fitting, key=lambda c: c.request_ms)
            break
    if chosen is None:
        worst = "; ".join(f"tp {c.tp} x pp {c.pp} {c.weights}: {c.reason}" for c in candidates[-len(pairs) :])
        raise AdapterError(
            f"No way to shard this {shape.family} decoder ({shape.params() / 1e9:.1f} B parameters) over "
            f"{cluster.spec} fits: {worst}.",
            "Use more devices, weight-only INT4 (--weights int4), a smaller batch or a shorter context.",
        )
    return DecoderPlan(
        cluster=cluster.spec, profile=cluster.profile.name, devices=n,
        shape={**asdict(shape), "params": shape.params()},
        workload={"batch": batch, "prompt": prompt, "new_tokens": new_tokens},
        tp=chosen.tp, pp=chosen.pp, weights=chosen.weights, candidates=candidates,
        assumptions={"compute": compute, "peak_flops": cluster.peak(compute),
                     "memory_bandwidth": cluster.memory_bandwidth, "memory_size": cluster.memory_size,
                     "interconnect": cluster.profile.interconnect.name,
                     "interconnect_bandwidth": cluster.profile.interconnect.bandwidth, "alpha_s": cluster.alpha},
    )  # fmt: skip
