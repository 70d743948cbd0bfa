"""The tokenizer an artifact carries (``tokenizer/`` beside the engine): saved at convert time
from the source's own tokenizer, loaded for text prompts and text embeddings.

Loading prefers ``tokenizer.json`` through the Rust ``tokenizers`` library alone (transformers
would import torch, ~0.3 GB resident, into a process that only serves); other tokenizers go
through transformers' ``AutoTokenizer`` with local files only and no remote code.
"""

from __future__ import annotations

__all__ = ["TOKENIZER_DIR", "encode_texts", "load_tokenizer", "max_length", "save_tokenizer"]

import json
from pathlib import Path
from typing import Any

TOKENIZER_DIR = "tokenizer"
_LONGEST = 100_000
"""transformers writes a huge ``model_max_length`` (1e30) when a model sets none."""


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """Write ``tokenizer`` (transformers' or a Rust ``tokenizers.Tokenizer``) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(folder))
    else:
        tokenizer.save(str(folder / "tokenizer.json"))


def load_tokenizer(folder: Path) -> Any | None:
    """The tokenizer saved in ``folder``, or None when there is none."""
    fast = folder / "tokenizer.json"
    if fast.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(fast))
        # a tokenizer saved after a padded call keeps that padding (MiniLM's: fixed 128) and
        # truncation in its JSON; requests are batched and checked for length by the server
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return tokenizer
    if folder.is_dir() and any(folder.iterdir()):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    return None


def max_length(folder: Path) -> int | None:
    """``model_max_length`` from the saved ``tokenizer_config.json`` (None when unset)."""
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text()).get("model_max_length")
    return int(value) if isinstance(value, (int, float)) and 0 < value < _LONGEST else None


def encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (special tokens as the tokenizer adds them; nothing cut)."""
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer
        return [e.ids for e in tokenizer.encode_batch(texts)]
    return [tokenizer(text)["input_ids"] for text in texts]
