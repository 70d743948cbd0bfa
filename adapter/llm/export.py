"""Export a causal LM with its KV cache as one ONNX graph (prefill and decode alike).

The graph takes ``input_ids``, ``attention_mask`` (past + new tokens, 1 = attend, so a
left-padded batch masks its padding), ``position_ids`` and, per layer,
``past_key_values.<i>.key`` / ``.value`` of shape (batch, kv_heads, past, head_dim), and
returns ``logits`` (batch, seq, vocab) and ``present.<i>.key`` / ``.value`` with
``past + seq`` positions. The past may be empty (prefill), so one graph serves both
phases; the names follow ONNX Runtime GenAI's. The cache holds the KV heads only
(grouped-query attention keeps its fewer KV heads). transformers' Falcon with the new
decoder architecture (Falcon-40B/180B) caches its keys and values after broadcasting them
to every query head (232 heads instead of 8 for Falcon-180B, a 29x larger cache); its
attention is exported through :func:`_falcon_gqa_forward`, which caches the KV heads and
repeats them after the cache, as Llama does. The eager model stays transformers' own:
:func:`eager_step` broadcasts the graph's cache to it and takes the KV heads back.
"""

from __future__ import annotations

__all__ = ["export_decoder", "eager_step"]

import contextlib
import math
import time
import types
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from adapter.converter.torch_export import to_numpy, to_onnx
from adapter.core.errors import ExportError
from adapter.core.specs import DEFAULT_DIM_MAX
from adapter.llm.layout import DecoderLayout

_MAX_BATCH = 64


class _KVDecoder(torch.nn.Module):
    """The causal LM with its cache as flat (key, value) tensors per layer."""

    def __init__(self, model: torch.nn.Module, layers: int) -> None:
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        from transformers import DynamicCache  # heavy (~1.5 s); only an export or eager check needs it

        cache = DynamicCache()
        for index, (key, value) in enumerate(past_key_values):
            cache.update(key, value, index)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
        )
        present = out.past_key_values
        return {
            "logits": out.logits,
            "present": [(present.layers[i].keys, present.layers[i].values) for i in range(self.layers)],
        }


def _falcon_groups(model: torch.nn.Module) -> int:
    """Query heads per KV head where transformers caches Falcon's keys broadcast to every
    query head (new decoder architecture, rotary), else 1 (the cache is as exported)."""
    config = model.config
    if getattr(config, "model_type", None) != "falcon" or not config.new_decoder_architecture or config.alibi:
        return 1
    return config.num_attention_heads // config.num_kv_heads


def _falcon_gqa_forward(self, hidden_states, alibi, attention_mask, position_ids=None, layer_past=None, **kwargs):
    """FalconAttention (new decoder architecture, rotary) caching its KV heads, not the broadcast.

    Same arithmetic as transformers' eager path: the fused projection holds, per KV head,
    ``groups`` query heads then one key and one value head; query head ``kv * groups + j``
    attends with KV head ``kv``, which ``repeat`` after the cache reproduces.
    """
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    fused = self.query_key_value(hidden_states)
    batch, length, _ = fused.shape
    groups = self.num_heads // self.num_kv_heads
    qkv = fused.view(batch, length, self.num_kv_heads, groups + 2, self.head_dim)
    query = qkv[:, :, :, :groups].reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
    key = qkv[:, :, :, groups].transpose(1, 2)
    value = qkv[:, :, :, groups + 1].transpose(1, 2)
    cos, sin = kwargs["position_embeddings"]
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    total = key.shape[2]
    key = key[:, :, None].expand(batch, self.num_kv_heads, groups, total, self.head_dim)
    value = value[:, :, None].expand(batch, self.num_kv_heads, groups, total, self.head_dim)
    key = key.reshape(batch, self.num_heads, total, self.head_dim)
    value = value.reshape(batch, self.num_heads, total, self.head_dim)
    scores = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(self.head_dim)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=hidden_states.dtype)
    out = torch.matmul(probs, value).transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
    return self.dense(out), None


@contextlib.contextmanager
def _kv_heads_cached(model: torch.nn.Module) -> Iterator[None]:
    """While exporting: Falcon's attention caches its KV heads (see the module's docstring)."""
    patched = []
    if _falcon_groups(model) > 1:
        from transformers.models.falcon.modeling_falcon import FalconAttention

        patched = [m for m in model.modules() if isinstance(m, FalconAttention)]
    for module in patched:
        module.forward = types.MethodType(_falcon_gqa_forward, module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def _eos_ids(config) -> tuple[int, ...]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


def layout_of(model: torch.nn.Module, family: str) -> DecoderLayout:
    """Read the cache layout from one eager step (heads as the model really caches them)."""
    config = model.config
    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True, return_dict=True)
    layers = out.past_key_values.layers
    _, cached_heads, _, head_dim = layers[0].keys.shape
    kv_heads = cached_heads // _falcon_groups(model)
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048)
    pad = getattr(config, "pad_token_id", None)
    bos = getattr(config, "bos_token_id", None)
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return DecoderLayout(
        family=family,
        num_layers=len(layers),
        kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        vocab_size=int(out.logits.shape[-1]),
        max_positions=int(max_positions),
        bos_token_id=int(bos) if isinstance(bos, int) else None,
        eos_token_ids=_eos_ids(config),
        pad_token_id=int(pad) if isinstance(pad, int) else None,
        sliding_window=int(window) if isinstance(window, int) and not isinstance(window, bool) else None,
    )


def _examples(layout: DecoderLayout, batch: int = 2, seq: int = 3, past: int = 5) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    shape = layout.cache_shape(batch, past)
    return {
        "input_ids": torch.randint(0, layout.vocab_size, (batch, seq), generator=generator),
        "attention_mask": torch.ones(batch, past + seq, dtype=torch.long),
        "position_ids": torch.arange(past, past + seq).expand(batch, seq).contiguous(),
        "past_key_values": [
            (torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
            for _ in range(layout.num_layers)
        ],
    }


def _rename(model: ir.Model, layout: DecoderLayout, symbols: dict[str, str]) -> None:
    inputs = list(model.graph.inputs)
    names = ["input_ids", "attention_mask", "position_ids", *layout.past_names()]
    outputs = list(model.graph.outputs)
    out_names = ["logits", *layout.present_names()]
    if len(inputs) != len(names) or len(outputs) != len(out_names):
        raise ExportError(
            f"The exported decoder has {len(inputs)} inputs and {len(outputs)} outputs; "
            f"expected {len(names)} and {len(out_names)}."
        )
    taken = {v.name for n in model.graph.all_nodes() for v in n.outputs}
    for value, name in [*zip(inputs, names), *zip(outputs, out_names)]:
        if value.name != name and name in taken:
            clash = next(v for n in model.graph.all_nodes() for v in n.outputs if v.name == name)
            clash.name = f"{name}__inner"
        value.name = name

    def fix(value: ir.Value) -> None:
        if value.shape is None:
            return
        dims = [symbols.get(d.value, d.value) if isinstance(d, ir.SymbolicDim) and d.value else d for d in value.shape]
        value.shape = ir.Shape(dims)

    # every value, not only the interface: a symbol named two ways (torch.export's ``s17`` inside,
    # ``batch`` on the inputs) keeps the fusion rules' shape checks from seeing one batch
    for value in [*model.graph.inputs, *(v for n in model.graph.all_nodes() for v in n.outputs)]:
        fix(value)


def _symbols(program) -> dict[str, str]:
    """torch.export's symbols for the batch, sequence, past and total lengths, by meaning."""
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user = {n.name: n for n in placeholders if n.name in set(program.graph_signature.user_inputs)}
    wanted = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {1: "total"}}
    found: dict[str, str] = {}
    for name, axes in wanted.items():
        value = user[name].meta["val"] if name in user else None
        for axis, meaning in axes.items():
            if value is not None and isinstance(value.shape[axis], torch.SymInt):
                found[str(value.shape[axis].node.expr)] = meaning
    past = next((n for key, n in user.items() if key.startswith("past_key_values")), None)
    if past is not None and isinstance(past.meta["val"].shape[2], torch.SymInt):
        found[str(past.meta["val"].shape[2].node.expr)] = "past"
    return found


def export_decoder(
    model: torch.nn.Module, family: str, device: str = "cpu"
) -> tuple[ir.Model, DecoderLayout, dict[str, float]]:
    """torch.export + the dynamo ONNX exporter of ``model`` with a dynamic KV cache.

    ``device="meta"``: a model whose parameters are on the meta device (no weights) is traced
    with meta example inputs; the graph's initializers are then meta tensors to be replaced
    (:mod:`adapter.llm.streamed`).

    Raises:
        ExportError: torch.export or the exporter failed (first lines of the reason).
    """
    layout = layout_of(model, family)
    wrapper = _KVDecoder(model, layout.num_layers).eval()
    examples = _examples(layout)
    if device != "cpu":
        examples = {k: v.to(device) if isinstance(v, torch.Tensor) else [(a.to(device), b.to(device)) for a, b in v]
                    for k, v in examples.items()}  # fmt: skip
    dynamic = torch.export.Dim.DYNAMIC
    cache_axes = ({0: dynamic, 2: dynamic}, {0: dynamic, 2: dynamic})
    shapes = {
        "input_ids": {0: dynamic, 1: dynamic},
        "attention_mask": {0: dynamic, 1: dynamic},
        "position_ids": {0: dynamic, 1: dynamic},
        "past_key_values": [cache_axes for _ in range(layout.num_layers)],
    }
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    try:
        with warnings.catch_warnings(), torch.no_grad(), _kv_heads_cached(model):
            warnings.simplefilter("ignore")
            program = torch.export.export(wrapper, (), examples, dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # torch.export raises many unrelated types
        first = " ".join(str(exc).split())[:400]
        raise ExportError(f"torch.export could not trace the {family} decoder with its KV cache: {first}") from exc
    seconds["torch_export"] = time.perf_counter() - started
    started = time.perf_counter()
    onnx_model = to_onnx(program, examples)
    seconds["onnx_export"] = time.perf_counter() - started
    _rename(onnx_model, layout, _symbols(program))
    return onnx_model, layout, seconds


def eager_step(model: torch.nn.Module, feeds: dict[str, np.ndarray], layout: DecoderLayout) -> dict[str, np.ndarray]:
    """Run the eager model on one step's named feeds (the graph's inputs); outputs by graph name.

    Where transformers caches broadcast KV heads (Falcon), the graph's KV-head cache is
    broadcast on the way in and the KV heads are taken back from the eager presents.
    """
    groups = _falcon_groups(model)
    past = [
        tuple(
            torch.from_numpy(feeds[f"past_key_values.{i}.{part}"]).repeat_interleave(groups, dim=1)
            for part in ("key", "value")
        )
        for i in range(layout.num_layers)
    ]
    wrapper = _KVDecoder(model, layout.num_layers)
    with torch.no_grad():
        out = wrapper(
            torch.from_numpy(feeds["input_ids"]),
            torch.from_numpy(feeds["attention_mask"]),
            torch.from_numpy(feeds["position_ids"]),
            past,
        )
    result = {"logits": to_numpy(out["logits"])}
    for i, (key, value) in enumerate(out["present"]):
        result[f"present.{i}.key"] = to_numpy(key[:, ::groups].contiguous())
        result[f"present.{i}.value"] = to_numpy(value[:, ::groups].contiguous())
    return result


DIM_LIMITS = {"batch": (1, _MAX_BATCH), "seq": (1, DEFAULT_DIM_MAX), "past": (0, DEFAULT_DIM_MAX)}
