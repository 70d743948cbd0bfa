"""Paged attention for OpenVINO decoders: one step runs every running row's next token and
prompt chunks of rows that are joining, over a KV cache of fixed-size blocks.

:func:`to_paged` rewrites a stateful decoder (``_openvino_decoder.build``'s model) for
OpenVINO's ``PagedAttentionExtension`` (what OpenVINO GenAI's continuous-batching pipeline
runs): each ``ScaledDotProductAttention`` over a state becomes a paged attention that reads
and writes per-layer ``key_cache.i`` / ``value_cache.i`` block tensors. The tokens of all
sequences of a step go in as one column (``input_ids`` of shape (tokens, 1)): every layer but
attention works token by token, and attention finds each sequence's tokens through
``subsequence_begins``, its cached length through ``past_lens`` and its blocks through
``block_indices``. ``sample_index`` picks the rows whose logits the LM head computes (the last
token of each sequence). OpenVINO's own ``paged_attention_transformation`` expects the graph
patterns of optimum-intel's exports; this rewrite works from the attention nodes instead.

:class:`PagedSlots` holds the blocks: allocated once for ``rows`` requests of ``capacity``
positions, handed to a row as its sequence grows and back when it ends. A row joins with no
copy and leaves with none, so a step costs its tokens' compute and nothing else.

Prefix caching: every full block is keyed by its tokens and the key of the block before it
(the whole prefix up to it). A prompt that starts with cached blocks takes them as they are
(:meth:`PagedSlots.reuse`) and computes only the rest, at least its last token. A block no row
holds keeps its contents until a new block is needed and none is free; then the one left
longest ago is taken.
"""

from __future__ import annotations

__all__ = ["PagedSlots", "to_paged"]

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from adapter.core.errors import AdapterError

SAMPLE = "sample_index"
_SEQUENCE_INPUTS = ("past_lens", "subsequence_begins", "block_indices", "block_indices_begins")


def _constant(value: Any, dtype) -> Any:
    import openvino.opset13 as ops

    return ops.constant(np.array(value, dtype=dtype))


def _parameter(name: str, shape: Any, element_type: Any) -> Any:
    import openvino.opset13 as ops

    node = ops.parameter(shape, element_type, name=name)
    node.output(0).get_tensor().set_names({name})
    return node


def _new_key_value(attention, index: int) -> Any:
    """The step's own keys (``index`` 1) or values (2) of an attention over a state: the input of
    the cache ``Concat`` that does not come from the state (past the GQA broadcast and views)."""
    node = attention.input_value(index).get_node()
    while node.get_type_name() != "Concat":
        if node.get_input_size() == 0:
            raise AdapterError("An attention's keys do not come from a cache concatenation; cannot page it.")
        node = node.input_value(0).get_node()
    new = [node.input_value(j) for j in range(node.get_input_size())
           if node.input_value(j).get_node().get_type_name() not in ("Gather", "ReadValue")]  # fmt: skip
    if len(new) != 1:
        raise AdapterError("An attention's cache concatenation has no single new-token input; cannot page it.")
    return new[0]


def _paged_inputs(scale: float) -> list[Any]:
    """The attention inputs after the block tables, for OpenVINO 2026.4's 28-input form:
    scale, sliding window (0: none), ALiBi slopes (none), then ``max_context_len``'s place
    (None) and the switches of features this engine does not use (score aggregation, cache
    rotation, xattention, adaptive RKV, sinks), each empty or 0 as OpenVINO's own transformation
    writes them."""
    empty = lambda dtype: _constant(np.zeros([0], dtype), dtype)  # noqa: E731
    return [
        _constant(scale, np.float32), _constant(0, np.int32), empty(np.float32), None,
        empty(np.int32), empty(np.int32), empty(np.int32), empty(np.float32), empty(np.float32),
        _constant(0, np.int32), _constant(0, np.int32), _constant(np.zeros([0, 0, 0, 0], np.float32), np.float32),
        _constant(0, np.int32), empty(np.int32), empty(np.int32), empty(np.int32), empty(np.int32),
        empty(np.uint8), empty(np.int32),
    ]  # fmt: skip


def to_paged(model, kv_heads: int, head_dim: int):
    """A new OpenVINO model that runs ``model``'s attention paged (see the module docstring).

    Raises:
        AdapterError: The graph has no attention over a state, or no LM-head slice to turn into
            a row pick (an engine built before ``logits_from``).
    """
    import openvino as ov
    import openvino.opset13 as ops
    from openvino._pyopenvino.op import _PagedAttentionExtension

    i32 = ov.Type.i32
    sequence = {name: _parameter(name, [-1], i32) for name in _SEQUENCE_INPUTS}
    max_context = _parameter("max_context_len", [], i32)
    sample = _parameter(SAMPLE, [-1], ov.Type.i64)
    attentions = [n for n in model.get_ordered_ops() if n.get_type_name() == "ScaledDotProductAttention"]
    if not attentions:
        raise AdapterError("The decoder has no attention node over its cache; it cannot run paged.")
    caches = []
    order = _constant([0, 2, 1, 3], np.int64)
    for layer, attention in enumerate(attentions):
        query = attention.input_value(0)
        heads = query.get_partial_shape()[1].get_length()
        flat = lambda x, h: ops.reshape(ops.transpose(x, order), _constant([-1, h * head_dim], np.int64), False)  # noqa: E731
        key_cache = _parameter(f"key_cache.{layer}", ov.PartialShape.dynamic(4), ov.Type.dynamic)
        value_cache = _parameter(f"value_cache.{layer}", ov.PartialShape.dynamic(4), ov.Type.dynamic)
        caches += [key_cache, value_cache]
        scale = 1.0 / np.sqrt(head_dim)
        if attention.get_input_size() > 4:
            scale = float(attention.input_value(4).get_node().get_data())
        rest = [max_context if arg is None else arg for arg in _paged_inputs(scale)]
        args = [flat(query, heads), flat(_new_key_value(attention, 1), kv_heads), flat(_new_key_value(attention, 2), kv_heads),
                key_cache, value_cache, *sequence.values(), *rest]  # fmt: skip
        paged = _PagedAttentionExtension([a.output(0) if hasattr(a, "output") else a for a in args])
        info = paged.get_rt_info()
        for key, value in (("num_k_heads", kv_heads), ("k_head_size", head_dim), ("num_v_heads", kv_heads), ("v_head_size", head_dim)):
            info[key] = value
        # back to the attention's (rows, heads, 1, head_dim): a step's rows are its tokens
        out = ops.transpose(ops.reshape(paged.output(0), _constant([-1, 1, heads, head_dim], np.int64), False), order)
        for target in list(attention.output(0).get_target_inputs()):
            target.replace_source_output(out.output(0))
    head = model.output("logits").get_node().input_value(0).get_node()
    sliced = head.input_value(0).get_node()
    if sliced.get_type_name() != "Slice":
        raise AdapterError("The decoder's LM head reads every position (an engine built before logits_from); convert it again.")
    head.input(0).replace_source_output(ops.gather(sliced.input_value(0), sample, _constant(0, np.int64)).output(0))
    for state in [n for n in model.get_ordered_ops() if n.get_type_name() == "ReadValue"]:
        for target in list(state.output(0).get_target_inputs()):
            if target.get_node().get_type_name() == "ShapeOf":  # the rows' count: from the state's initializer
                target.replace_source_output(state.input_value(0))
    kept = [p for p in model.get_parameters() if p.get_friendly_name() in ("input_ids", "position_ids")]
    paged_model = ov.Model(model.get_results(), [*kept, *caches, *sequence.values(), max_context, sample], "paged")
    left = sorted({n.get_type_name() for n in paged_model.get_ordered_ops()} & {"ReadValue", "ScaledDotProductAttention"})
    if left:
        raise AdapterError(f"Paging the decoder left {', '.join(left)} nodes in it; it cannot run paged.")
    return paged_model


def _key(before: int, tokens: Sequence[int]) -> int:
    """A full block's key: its tokens and the key of the block before it (0 for the first)."""
    return hash((before, tuple(tokens)))


class PagedSlots:
    """Rows over block tables (the module docstring); :class:`adapter.serve.mixed.MixedBatcher`
    calls ``step`` and ``release``."""

    mixed = True

    def __init__(self, compiled, rows: int, capacity: int, on_step=lambda: None) -> None:
        import openvino as ov

        self.request = compiled.create_infer_request()
        self.block = compiled.input("value_cache.0").get_partial_shape()[2].get_length()
        blocks = rows * -(-capacity // self.block)
        self.cache_bytes = 0
        for port in compiled.inputs:
            name = port.get_any_name()
            if "_cache." in name:
                shape = [blocks] + [d.get_length() for d in list(port.get_partial_shape())[1:]]
                tensor = ov.Tensor(port.get_element_type(), shape)
                self.cache_bytes += tensor.byte_size
                self.request.set_tensor(name, tensor)
        self.rows, self.capacity, self.blocks = rows, capacity, blocks
        self.free = list(range(blocks))
        self.tables: dict[int, list[int]] = {}
        self.on_step = on_step
        self.steps = 0
        # prefix caching (the module docstring)
        self.holders = [0] * blocks
        self.key_of: dict[int, int] = {}
        """A full block's key: its tokens and the key of the block before it."""
        self.block_of: dict[int, int] = {}
        self.idle: OrderedDict[int, None] = OrderedDict()
        """Cached blocks no row holds, in the order they were let go (the first is taken first)."""
        self.tokens: dict[int, list[int]] = {}
        """Each row's tokens in its cache (how many: the positions it holds)."""
        self.keys: dict[int, list[int]] = {}
        self.reused = 0
        """Prompt tokens taken from the cache instead of computed."""

    def _take(self) -> int:
        if self.free:
            block = self.free.pop()
        else:  # the cached block let go longest ago
            block, _ = self.idle.popitem(last=False)
            del self.block_of[self.key_of.pop(block)]
        self.holders[block] = 1
        return block

    def unused(self) -> int:
        """Blocks no row holds (free, or cached and idle)."""
        return len(self.free) + len(self.idle)

    def reuse(self, row: int, prompt: Sequence[int]) -> int:
        """Start ``row`` on the cached blocks ``prompt`` begins with (whole blocks, leaving at
        least its last token to compute); how many of its tokens they hold."""
        if self.tables.get(row):
            raise AdapterError(f"Row {row} is in use.")
        blocks, keys, held, key = [], [], 0, 0
        while held + self.block < len(prompt):
            key = _key(key, prompt[held : held + self.block])
            block = self.block_of.get(key)
            if block is None:
                break
            blocks.append(block)
            keys.append(key)
            held += self.block
        for block in blocks:
            self.holders[block] += 1
            self.idle.pop(block, None)
        self.tables[row], self.keys[row], self.tokens[row] = blocks, keys, list(prompt[:held])
        self.reused += held
        return held

    def _register(self, row: int) -> None:
        """Key ``row``'s blocks that are full now (the first block of a key keeps it)."""
        tokens, keys, table = self.tokens[row], self.keys.setdefault(row, []), self.tables[row]
        while len(keys) < len(tokens) // self.block:
            i = len(keys)
            key = _key(keys[-1] if keys else 0, tokens[i * self.block : (i + 1) * self.block])
            keys.append(key)
            if key not in self.block_of and table[i] not in self.key_of:
                self.block_of[key], self.key_of[table[i]] = table[i], key

    def step(self, sequences: Sequence[tuple[int, Sequence[int], int]]) -> np.ndarray:
        """One forward of every ``(row, tokens, start)``: ``tokens`` go in at positions
        ``start...`` of ``row``'s sequence (``start`` is what its cache holds). The logits of
        each sequence's last token, (len(sequences), vocab)."""
        ids: list[int] = []
        positions: list[int] = []
        past, begins, table, table_begins = [], [0], [], [0]
        longest = 0
        for row, tokens, start in sequences:
            held = len(self.tokens.get(row, ()))
            if start != held:
                raise AdapterError(f"Row {row} holds {held} positions, not {start}.")
            end = start + len(tokens)
            if end > self.capacity:
                raise AdapterError(f"Row {row} would hold {end} positions, more than its capacity of {self.capacity}.")
            blocks = self.tables.setdefault(row, [])
            while len(blocks) * self.block < end:
                blocks.append(self._take())
            ids += list(tokens)
            positions += range(start, end)
            past.append(start)
            begins.append(begins[-1] + len(tokens))
            table += blocks
            table_begins.append(len(table))
            longest = max(longest, end)
        feed = {
            "input_ids": np.array(ids, np.int64)[:, None],
            "position_ids": np.array(positions, np.int64)[:, None],
            "past_lens": np.array(past, np.int32),
            "subsequence_begins": np.array(begins, np.int32),
            "block_indices": np.array(table, np.int32),
            "block_indices_begins": np.array(table_begins, np.int32),
            "max_context_len": np.array(longest, np.int32),
            SAMPLE: np.array(begins[1:], np.int64) - 1,
        }
        try:
            self.request.infer(feed)
        except Exception as exc:
            raise AdapterError(f"OpenVINO failed in a paged decoder step: {str(exc).splitlines()[0][:300]}") from exc
        for row, tokens, _ in sequences:
            self.tokens.setdefault(row, []).extend(tokens)
            self._register(row)
        self.steps += 1
        self.on_step()
        return np.array(self.request.get_output_tensor(0).data[:, -1], dtype=np.float32, copy=True)

    def release(self, row: int) -> None:
        """``row``'s blocks are let go (a cached one stays cached while no block is short); the
        row starts empty next time."""
        for block in self.tables.pop(row, []):
            self.holders[block] -= 1
            if self.holders[block] == 0:
                if block in self.key_of:
                    self.idle[block] = None
                else:
                    self.free.append(block)
        self.tokens.pop(row, None)
        self.keys.pop(row, None)

    def __repr__(self) -> str:
        return f"PagedSlots(rows={self.rows}, block={self.block}, unused blocks={self.unused()})"
