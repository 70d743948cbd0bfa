"""A decoder graph's layout: what a generate runtime needs to know, without torch.

Kept apart from :mod:`adapter.llm.export` so that loading an engine and generating
(``LLMEngine``, ``adapter generate``) never imports torch (~0.3 GB of resident memory).
"""

from __future__ import annotations

__all__ = ["DecoderLayout"]

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class DecoderLayout:
    """What a generate runtime needs to know about an exported decoder graph."""

    family: str
    num_layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    sliding_window: int | None = None
    """Positions a token attends back over, where the model limits it (Mistral v0.1, Phi-3)."""

    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{part}" for i in range(self.num_layers) for part in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{part}" for i in range(self.num_layers) for part in ("key", "value")]

    def cache_shape(self, batch: int, length: int) -> tuple[int, int, int, int]:
        return (batch, self.kv_heads, length, self.head_dim)

    def kv_bytes(self, batch: int, context: int, itemsize: int = 4) -> int:
        """Bytes of the whole KV cache at ``batch`` x ``context`` positions."""
        return 2 * self.num_layers * batch * self.kv_heads * context * self.head_dim * itemsize

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["eos_token_ids"] = list(self.eos_token_ids)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DecoderLayout:
        return cls(**{**data, "eos_token_ids": tuple(data.get("eos_token_ids", ()))})
