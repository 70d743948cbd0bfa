"""Sharding planner: tensor-parallel and pipeline-parallel degrees from a cost model.

Given a canonical onnx-ir graph and a cluster ``"<N>x<profile>"`` (``4xnvidia-a100``,
``2xhost``), :func:`plan_sharding` tries every ``(tp, pp)`` with ``tp * pp == N`` and keeps
the fastest one whose memory per rank fits the device.

What it reads from the graph (:func:`analyze`):

* transformer blocks: the nodes' ``adapter.module`` paths (kept by the importer), grouped by
  the module list with the most numbered children (``model.encoder.layer.<i>``,
  ``model.transformer.h.<i>``); nodes before the first block are the embedding part, nodes
  after the last the head part;
* which nodes Megatron-style tensor parallelism splits, by data flow inside each block: a
  MatMul/Gemm with a 2-D weight on a replicated input is column-parallel and makes its output
  sharded; ops fed by a sharded value stay sharded; a weight MatMul on a sharded input is
  row-parallel and is followed by one all-reduce of its output (two per block in BERT/GPT
  blocks). In the embedding part the largest Gather table (the vocabulary) is split, in the
  head part a weight MatMul with a vocabulary-sized dim (the LM head, then an all-gather);
* attention heads from the block's rank-4 Reshape ``(batch, seq, heads, head_dim)``; when the
  graph has none, ``heads=`` or the fallback ``hidden // 64`` (64-wide heads, BERT/GPT habit).

Cost model, per candidate (every figure per rank, ``m`` microbatches of ``mb`` samples):

* node time: roofline ``max(FLOPs / peak[precision], bytes / memory_bandwidth)`` from the op
  library at ``batch=mb``, divided by ``tp`` for split nodes. Bytes move weights once per
  microbatch, so tiny microbatches of a memory-bound model are not free;
* step time of a stage: its nodes' time + tensor-parallel collectives (ring all-reduce
  ``alpha + 2 (tp-1)/tp * bytes / bandwidth`` per row-parallel MatMul and for the vocabulary
  embedding, all-gather ``alpha + (tp-1)/tp * bytes / bandwidth`` of the LM head's logits)
  + sending its output to the next stage (``alpha + bytes / bandwidth``, the values live
  across the cut);
* latency: GPipe, ``(m + pp - 1) * slowest step``; with ``pp > 1`` and no ``microbatches=``
  every divisor of the batch is tried and the fastest fitting ``m`` kept;
* memory: weights (split ones ``/ tp``; blocks on their stage, embedding on the first, head on
  the last) + the largest live activation set of the stage at ``mb`` (sharded values ``/ tp``)
  + two boundary buffers + workspace (:data:`WORKSPACE_BYTES` plus :data:`WORKSPACE_SLACK` of
  the rest) must be at most the profile's ``memory_size``.

``alpha`` (:data:`LINK_LATENCY`): 5 us over NVLink / Infinity Fabric (NCCL small-message
latency), 10 us over PCIe, 50 us between CPU processes (gloo). ``host`` ranks share one
machine: each gets ``1/N`` of its measured peak, memory bandwidth and memory.
"""

from __future__ import annotations

__all__ = [
    "LINK_LATENCY",
    "WORKSPACE_BYTES",
    "WORKSPACE_SLACK",
    "Candidate",
    "Cluster",
    "ModelFacts",
    "ShardingPlan",
    "Stage",
    "analyze",
    "parse_cluster",
    "plan_sharding",
]

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from adapter.core.errors import AdapterError, ProfileError
from adapter.op_library import node_cost
from adapter.passes._sharding_facts import FLOATS, POST, PRE, ModelFacts, analyze, nbytes
from adapter.profiles import HOST, Profile, list_profiles, load_profile

LINK_LATENCY = {"pcie": 10e-6, "nvlink": 5e-6, "infinity fabric": 5e-6, "xgmi": 5e-6, "cpu": 50e-6, "other": 10e-6}
"""Per-message latency alpha in seconds, by link kind: the first kind the interconnect's name mentions."""
WORKSPACE_BYTES = 512 * 2**20
"""Fixed per-rank allowance: runtime context, library workspaces, communication buffers."""
WORKSPACE_SLACK = 0.10
"""Extra fraction of weights + activations kept free for allocator fragmentation."""
_WEIGHT_FACTOR = {"fp32": 1.0, "tf32": 1.0, "fp16": 0.5, "bf16": 0.5, "fp8": 0.25, "int8": 0.25, "int4": 0.125}
_ACT_FACTOR = {"fp32": 1.0, "tf32": 1.0, "fp16": 0.5, "bf16": 0.5, "fp8": 0.5, "int8": 0.5, "int4": 0.5}
_CLUSTER = re.compile(r"^\s*(\d+)\s*[xX]\s*(\S+)\s*$")


# --------------------------------------------------------------------------- cluster


@dataclass(frozen=True)
class Cluster:
    """``count`` devices (or processes) of one profile."""

    spec: str
    count: int
    profile: Profile
    shared: bool
    """The ranks share one machine (``host``): peak, bandwidth and memory are divided among them."""

    @property
    def alpha(self) -> float:
        """Per-message link latency in seconds."""
        name = self.profile.interconnect.name.lower()
        if self.profile.kind == "cpu":
            return LINK_LATENCY["cpu"]
        return next((v for k, v in LINK_LATENCY.items() if k in name), LINK_LATENCY["other"])

    def peak(self, precision: str) -> float:
        return self.profile.peak(precision) / (self.count if self.shared else 1)

    @property
    def memory_bandwidth(self) -> float:
        return self.profile.memory_bandwidth / (self.count if self.shared else 1)

    @property
    def memory_size(self) -> float:
        return self.profile.memory_size / (self.count if self.shared else 1)


def parse_cluster(spec: str) -> Cluster:
    """Parse ``"<N>x<profile>"`` (``2xnvidia-a100``, ``2xhost``) and load the profile.

    Raises:
        AdapterError: The text is not of that form, N is not positive, or the profile is unknown.
    """
    match = _CLUSTER.match(spec or "")
    if not match or int(match.group(1)) < 1:
        raise AdapterError(
            f"Cannot read the cluster '{spec}': expected '<N>x<profile>' with N >= 1.",
            "For example 4xnvidia-a100 or 2xhost.",
        )
    count, name = int(match.group(1)), match.group(2)
    try:
        profile = load_profile(name)
    except ProfileError as exc:
        raise AdapterError(
            f"Cluster '{spec}': unknown profile '{name}'.", f"Known profiles: {', '.join(list_profiles())}."
        ) from exc
    return Cluster(spec.strip(), count, profile, shared=name == HOST and count > 1)


# --------------------------------------------------------------------------- cost tables


@dataclass
class _Table:
    """Per-node figures at one microbatch size (bytes already at the plan's precision)."""

    flops: list[float]
    time: list[float]
    """Roofline seconds on one unsplit device."""
    message: list[float]
    """Output bytes of nodes followed by a collective."""
    live_split: list[float]
    live_repl: list[float]
    produced: list[tuple[int, int, float]]
    """(producer index or -1, last consumer index or len(nodes), bytes) per activation value."""


def _sizes(model: Any, batch: int, seq: int) -> dict[str, int]:
    sizes = {"batch": batch, "seq": seq}
    for value in model.graph.inputs:
        shape = value.shape or ()
        for axis, dim in enumerate(shape[:2]):
            name = getattr(dim, "value", None)
            if isinstance(name, str):
                sizes.setdefault(name, batch if axis == 0 else seq)
    return sizes


def _table(model: Any, facts: ModelFacts, cluster: Cluster, precision: str, batch: int, seq: int) -> _Table:
    sizes = _sizes(model, batch, seq)
    peak, bandwidth = cluster.peak(precision), cluster.memory_bandwidth
    act, wf = _ACT_FACTOR.get(precision, 1.0), _WEIGHT_FACTOR.get(precision, 1.0)
    nodes = facts.nodes
    count = len(nodes)
    flops, time, message = [0.0] * count, [0.0] * count, [0.0] * count
    for i, node in enumerate(nodes):
        try:
            cost = node_cost(node, sizes)
        except KeyError:
            continue
        moved = ((cost.bytes or 0) - facts.weight_inputs[i]) * act + facts.weight_inputs[i] * wf
        flops[i] = float(cost.flops or 0)
        time[i] = max(flops[i] / peak, max(moved, 0.0) / bandwidth)
        if facts.reduce_after[i] or facts.gather_after[i]:
            message[i] = sum(nbytes(v, sizes) for v in node.outputs if v is not None) * act
    position = {id(n): i for i, n in enumerate(nodes)}
    outputs = {id(v) for v in model.graph.outputs}
    produced: list[tuple[int, int, float]] = []
    values = [(-1, v) for v in model.graph.inputs]
    values += [(i, v) for i, n in enumerate(nodes) for v in n.outputs if v is not None]
    delta_split, delta_repl = [0.0] * (count + 2), [0.0] * (count + 2)
    for producer, value in values:
        users = [position[id(u.node)] for u in value.uses() if id(u.node) in position]
        last = count if id(value) in outputs else max(users, default=max(producer, 0))
        size = nbytes(value, sizes) * (act if getattr(value.dtype, "name", "") in FLOATS else 1.0)
        produced.append((producer, last, size))
        delta = delta_split if id(value) in facts.sharded_values else delta_repl
        delta[max(producer, 0)] += size
        delta[last + 1] -= size  # live from its producer until its last consumer has run
    live_split, live_repl, s, r = [0.0] * count, [0.0] * count, 0.0, 0.0
    for i in range(count):
        s += delta_split[i]
        r += delta_repl[i]
        live_split[i], live_repl[i] = s, r
    return _Table(flops, time, message, live_split, live_repl, produced)


# --------------------------------------------------------------------------- candidates


@dataclass
class Stage:
    """One pipeline stage: a range of blocks (plus the embedding on the first, the head on the last)."""

    index: int
    layers: tuple[int, int]
    """Blocks ``[start, stop)`` of :attr:`ModelFacts.layers`."""
    first_layer: str
    last_layer: str
    embedding: bool
    head: bool
    flops: float
    """FLOPs of one microbatch on one rank of the stage."""
    step_ms: float
    """Time of one microbatch: compute + tensor-parallel collectives + send to the next stage."""
    weight_bytes: float
    activation_bytes: float
    memory_bytes: float
    """Weights + activations + workspace, per rank."""


@dataclass
class Candidate:
    """One (tp, pp) with its estimate; ``reason`` says why it was rejected (None when it fits)."""

    tp: int
    pp: int
    microbatches: int = 1
    microbatch_size: int = 0
    fits: bool = False
    memory_bytes: float | None = None
    """The largest per-rank memory over the stages."""
    compute_ms: float | None = None
    tp_comm_ms: float | None = None
    pp_comm_ms: float | None = None
    total_ms: float | None = None
    bubble: float | None = None
    """Share of the schedule a stage idles: (pp - 1) / (m + pp - 1)."""
    reason: str | None = None
    stages: list[Stage] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _ring_all_reduce(bytes_: float, tp: int, cluster: Cluster) -> float:
    return cluster.alpha + 2 * (tp - 1) / tp * bytes_ / cluster.profile.interconnect.bandwidth


def _all_gather(bytes_: float, tp: int, cluster: Cluster) -> float:
    return cluster.alpha + (tp - 1) / tp * bytes_ / cluster.profile.interconnect.bandwidth


def _part_costs(facts: ModelFacts, table: _Table, tp: int, cluster: Cluster) -> dict[int, list[float]]:
    """Per part (block index, PRE, POST): [compute seconds, collective seconds, flops] on one rank."""
    costs: dict[int, list[float]] = {}
    for i, part in enumerate(facts.part):
        entry = costs.setdefault(part, [0.0, 0.0, 0.0])
        share = tp if facts.split[i] else 1
        entry[0] += table.time[i] / share
        entry[2] += table.flops[i] / share
        if tp > 1 and facts.reduce_after[i]:
            entry[1] += _ring_all_reduce(table.message[i], tp, cluster)
        if tp > 1 and facts.gather_after[i]:
            entry[1] += _all_gather(table.message[i], tp, cluster)
    return costs


def _balance(layer_cost: list[float], pre: float, post: float, pp: int) -> list[tuple[int, int]]:
    """Contiguous block ranges for pp stages minimising the slowest stage (pre on the first, post on the last)."""
    n = len(layer_cost)
    prefix = [0.0]
    for c in layer_cost:
        prefix.append(prefix[-1] + c)

    def cost(a: int, b: int, s: int) -> float:
        return prefix[b] - prefix[a] + (pre if s == 0 else 0.0) + (post if s == pp - 1 else 0.0)

    best = {(0, 0): (0.0, [])}  # (stages placed, blocks used) -> (slowest, ranges)
    for s in range(pp):
        for used in range(s, n):
            if (s, used) not in best:
                continue
            slowest, ranges = best[(s, used)]
            last_stop = n if s == pp - 1 else n - (pp - 1 - s)
            for stop in range(used + 1, last_stop + 1):
                if s == pp - 1 and stop != n:
                    continue
                value = (max(slowest, cost(used, stop, s)), [*ranges, (used, stop)])
                if (s + 1, stop) not in best or value[0] < best[(s + 1, stop)][0]:
                    best[(s + 1, stop)] = value
    return best[(pp, n)][1]


def _evaluate(
    facts: ModelFacts, table: _Table, cluster: Cluster, precision: str, tp: int, pp: int, m: int, mb: int
) -> Candidate:
    costs = _part_costs(facts, table, tp, cluster)
    layer_cost = [sum(costs.get(i, [0.0, 0.0])[:2]) for i in range(len(facts.layers))]
    pre, post = sum(costs.get(PRE, [0.0, 0.0])[:2]), sum(costs.get(POST, [0.0, 0.0])[:2])
    ranges = _balance(layer_cost, pre, post, pp)
    stage_of_layer = {layer: s for s, (a, b) in enumerate(ranges) for layer in range(a, b)}
    count = len(facts.nodes)

    def stage_of_node(i: int) -> int:
        if i < 0:
            return 0
        if i >= count:
            return pp - 1
        part = facts.part[i]
        return 0 if part == PRE else pp - 1 if part == POST else stage_of_layer[part]

    node_stage = [stage_of_node(i) for i in range(count)]
    cuts = [0.0] * pp
    for producer, last, size in table.produced:
        for s in range(stage_of_node(producer), stage_of_node(last)):
            cuts[s] += size
    wf = _WEIGHT_FACTOR.get(precision, 1.0)
    weights = [0.0] * pp
    for first_use, size, split, floating in facts.weights:
        weights[node_stage[first_use]] += size * (wf if floating else 1.0) / (tp if split else 1)
    live = [0.0] * pp
    for i in range(count):
        live[node_stage[i]] = max(live[node_stage[i]], table.live_split[i] / tp + table.live_repl[i])
    bandwidth = cluster.profile.interconnect.bandwidth
    stages, steps = [], []
    for s, (a, b) in enumerate(ranges):
        parts = [*range(a, b), *([PRE] if s == 0 else []), *([POST] if s == pp - 1 else [])]
        compute = sum(costs.get(p, [0.0])[0] for p in parts)
        comm = sum(costs.get(p, [0.0, 0.0])[1] for p in parts)
        send = cluster.alpha + cuts[s] / bandwidth if s < pp - 1 else 0.0
        steps.append((compute + comm + send, compute, comm, send))
        memory = weights[s] + live[s]
        memory += WORKSPACE_BYTES + WORKSPACE_SLACK * memory
        stages.append(
            Stage(
                index=s,
                layers=(a, b),
                first_layer=facts.layers[a],
                last_layer=facts.layers[b - 1],
                embedding=s == 0,
                head=s == pp - 1,
                flops=sum(costs.get(p, [0.0, 0.0, 0.0])[2] for p in parts),
                step_ms=steps[-1][0] * 1e3,
                weight_bytes=weights[s],
                activation_bytes=live[s],
                memory_bytes=memory,
            )
        )
    step, compute, comm, send = max(steps)
    n_steps = m + pp - 1
    memory = max(st.memory_bytes for st in stages)
    fits = memory <= cluster.memory_size
    reason = None
    if not fits:
        reason = (
            f"needs {memory / 2**30:.2f} GiB per rank, a {cluster.profile.name} rank has "
            f"{cluster.memory_size / 2**30:.2f} GiB"
        )
    return Candidate(
        tp=tp,
        pp=pp,
        microbatches=m,
        microbatch_size=mb,
        fits=fits,
        memory_bytes=memory,
        compute_ms=n_steps * compute * 1e3,
        tp_comm_ms=n_steps * comm * 1e3,
        pp_comm_ms=n_steps * send * 1e3,
        total_ms=n_steps * step * 1e3,
        bubble=(pp - 1) / n_steps,
        reason=reason,
        stages=stages,
    )


# --------------------------------------------------------------------------- the plan


@dataclass
class ShardingPlan:
    """The chosen degrees, stages and estimate, with every candidate considered."""

    cluster: str
    profile: str
    devices: int
    precision: str
    batch: int
    seq: int
    tp: int
    pp: int
    microbatches: int
    microbatch_size: int
    stages: list[Stage]
    memory_per_rank: float
    """Bytes, the largest over the stages."""
    estimate: dict[str, float]
    """``compute_ms``, ``tp_comm_ms``, ``pp_comm_ms``, ``total_ms``, ``bubble``."""
    candidates: list[Candidate]
    model: dict[str, Any]
    """:meth:`ModelFacts.summary` plus per-block FLOPs and bytes at the full batch."""
    assumptions: dict[str, Any]

    @property
    def chosen(self) -> Candidate:
        return next(c for c in self.candidates if (c.tp, c.pp) == (self.tp, self.pp))

    def to_json(self) -> dict[str, Any]:
        """The plan as JSON-ready data."""
        return asdict(self)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_sharding(
    model: Any,
    target: str | Cluster,
    *,
    batch: int = 1,
    seq: int = 128,
    precision: str = "fp32",
    tp: int | None = None,
    pp: int | None = None,
    microbatches: int | None = None,
    heads: int | None = None,
) -> ShardingPlan:
    """Choose tensor- and pipeline-parallel degrees for a canonical onnx-ir model on a cluster.

    Args:
        model: The canonical onnx-ir model (after the ``canonicalize`` pipeline).
        target: ``"<N>x<profile>"`` or a parsed :class:`Cluster`.
        batch: Samples per request; the latency estimate is for the whole batch.
        seq: Sequence length (the graph's ``seq`` dims).
        precision: Compute precision: the profile's peak for it, and bytes per element.
        tp: Force this tensor-parallel degree (``pp`` follows from the device count).
        pp: Force this pipeline-parallel degree.
        microbatches: GPipe microbatches; default: the fastest divisor of ``batch`` that fits.
        heads: Attention heads, when the graph does not show them.

    Returns:
        The plan, with every candidate in ``candidates``.

    Raises:
        AdapterError: Bad cluster text or figures, an impossible override, or nothing fits.
    """
    cluster = target if isinstance(target, Cluster) else parse_cluster(target)
    n = cluster.count
    for name, value in (("batch", batch), ("seq", seq), ("heads", heads), ("microbatches", microbatches)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise AdapterError(f"{name} must be a positive integer, got {value!r}.")
    if microbatches is not None and microbatches > batch:
        raise AdapterError(
            f"{microbatches} microbatches do not fit a batch of {batch}.", "Use at most one microbatch per sample."
        )
    try:
        cluster.peak(precision)
    except ProfileError as exc:
        raise AdapterError(exc.message, exc.hint) from exc
    facts = analyze(model, heads)
    n_layers = len(facts.layers)

    def problem(t: int, p: int) -> str | None:
        if facts.heads % t:
            return f"tp={t} does not divide the {facts.heads} attention heads"
        if p > n_layers:
            return f"pp={p} exceeds the {n_layers} transformer block{'s' if n_layers > 1 else ''}"
        return None

    if tp is not None or pp is not None:
        t = tp if tp is not None else n // pp if pp and n % pp == 0 else None
        p = pp if pp is not None else n // tp if tp and n % tp == 0 else None
        if not t or not p or t < 1 or p < 1 or t * p != n:
            raise AdapterError(
                f"--tp {tp} --pp {pp} does not use the {n} devices of {cluster.spec}.",
                f"Choose tp x pp = {n}: {', '.join(f'{d}x{n // d}' for d in _divisors(n))}.",
            )
        why = problem(t, p)
        if why:
            raise AdapterError(
                f"Cannot shard as tp={t}, pp={p} on {cluster.spec}: {why}.",
                f"tp must divide {facts.heads} and pp be at most {n_layers}; "
                f"or drop --tp/--pp to let the planner choose.",
            )
        wanted = [(t, p)]
    else:
        wanted = [(d, n // d) for d in _divisors(n)]

    tables: dict[int, _Table] = {}

    def table(mb: int) -> _Table:
        if mb not in tables:
            tables[mb] = _table(model, facts, cluster, precision, mb, seq)
        return tables[mb]

    candidates: list[Candidate] = []
    for t, p in wanted:
        why = problem(t, p)
        if why:
            candidates.append(Candidate(tp=t, pp=p, reason=why))
            continue
        counts = [microbatches] if microbatches else (_divisors(batch) if p > 1 else [1])
        tried = [
            _evaluate(facts, table(math.ceil(batch / m)), cluster, precision, t, p, m, math.ceil(batch / m))
            for m in counts
        ]
        fitting = [c for c in tried if c.fits]
        candidates.append(
            min(fitting, key=lambda c: c.total_ms) if fitting else min(tried, key=lambda c: c.memory_bytes)
        )
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        lines = "; ".join(f"tp={c.tp} pp={c.pp}: {c.reason}" for c in candidates)
        raise AdapterError(
            f"No tensor/pipeline split of the model fits {cluster.spec}: {lines}.",
            "Use more devices, a lower precision (--precision fp16), or a smaller batch or sequence.",
        )
    best = min(fitting, key=lambda c: (c.total_ms, c.tp))
    full = table(batch)
    per_layer = [[0.0, 0.0] for _ in facts.layers]
    for i, part in enumerate(facts.part):
        if part not in (PRE, POST):
            per_layer[part][0] += full.flops[i]
            per_layer[part][1] += full.time[i]
    model_info = facts.summary() | {
        "layer_flops": [f for f, _ in per_layer],
        "layer_ms": [t * 1e3 for _, t in per_layer],
        "layer_weight_bytes": facts.layer_weight_bytes,
    }
    return ShardingPlan(
        cluster=cluster.spec,
        profile=cluster.profile.name,
        devices=n,
        precision=precision,
        batch=batch,
        seq=seq,
        tp=best.tp,
        pp=best.pp,
        microbatches=best.microbatches,
        microbatch_size=best.microbatch_size,
        stages=best.stages,
        memory_per_rank=best.memory_bytes,
        estimate={k: getattr(best, k) for k in ("compute_ms", "tp_comm_ms", "pp_comm_ms", "total_ms", "bubble")},
        candidates=candidates,
        model=model_info,
        assumptions={
            "peak_flops": cluster.peak(precision),
            "memory_bandwidth": cluster.memory_bandwidth,
            "memory_size": cluster.memory_size,
            "interconnect": cluster.profile.interconnect.name,
            "interconnect_bandwidth": cluster.profile.interconnect.bandwidth,
            "alpha_s": cluster.alpha,
            "workspace_bytes": WORKSPACE_BYTES,
            "workspace_slack": WORKSPACE_SLACK,
            "shared_host": cluster.shared,
            "schedule": "GPipe: (m + pp - 1) x slowest stage step",
        },
    )
