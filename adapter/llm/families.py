"""Causal language models adapter can export with a KV cache: families, sources, tiny configs.

A causal LM source is either a local Hugging Face folder whose ``config.json`` names a
``...ForCausalLM`` (or ``GPT2LMHeadModel``) architecture of a supported family, with
safetensors weights, or a factory ``file.py:fn`` / ``pkg.mod:fn`` returning such a model.
Nothing is fetched from a hub; a folder's own code never runs (``trust_remote_code`` off).
"""

from __future__ import annotations

__all__ = [
    "FAMILIES", "CausalLM", "family_of_config", "is_causal_lm_source", "load_causal_lm", "tiny_config",
    "tiny_model", "write_random_folder", "write_random_shards", "write_word_tokenizer",
]  # fmt: skip

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapter.converter.importer import load_factory
from adapter.core import safety
from adapter.core.errors import SourceError, UnsafeSourceError

FAMILIES: dict[str, str] = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "phi3": "Phi3Config",
    "gemma": "GemmaConfig",
    "gpt2": "GPT2Config",
    "falcon": "FalconConfig",
}
"""Hugging Face ``model_type`` of each supported decoder family, to its config class."""

_TINY = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_TINY_EXTRA: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": None},
    "qwen3": {"head_dim": 16},
    "phi3": {"pad_token_id": 0},
    "gemma": {"head_dim": 16},
}


def _transformers():
    """transformers, imported on first use: it costs ~1.5 s, and every ``adapter`` command
    imports this module (the CLI registers ``generate``)."""
    import transformers

    return transformers


@dataclass
class CausalLM:
    """A loaded causal LM: the eager model, its family and, where the folder has one, a tokenizer."""

    model: torch.nn.Module
    family: str
    source: str
    kind: str
    tokenizer: Any = None


def _names_causal_lm(config: dict[str, Any]) -> bool:
    """The config's architectures include a causal LM (``...ForCausalLM``, ``...LMHeadModel``)."""
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.get("architectures") or [])


def family_of_config(config: dict[str, Any]) -> str | None:
    """The supported family a ``config.json`` describes as a causal LM, else None."""
    family = config.get("model_type")
    return family if _names_causal_lm(config) and family in FAMILIES else None


def _config_json(folder: Path) -> dict[str, Any] | None:
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_causal_lm_source(source: str) -> bool:
    """True for a folder whose config names a ``...ForCausalLM`` architecture (any family).

    Unsupported families also answer True, so that loading them gives a clear refusal
    instead of an encoder export of a decoder.
    """
    folder = Path(source)
    if folder.is_dir():
        return _names_causal_lm(_config_json(folder) or {})
    return False


def _is_causal_module(module: Any) -> bool:
    transformers = _transformers()
    return isinstance(module, transformers.PreTrainedModel) and isinstance(module, transformers.GenerationMixin)


def factory_causal_lm(source: str) -> CausalLM | None:
    """Run a factory; a causal LM (alone or first of a tuple) comes back wrapped, else None."""
    try:
        built = load_factory(source)()
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"The factory '{source}' failed: {type(exc).__name__}: {exc}") from exc
    module = built[0] if isinstance(built, tuple) else built
    if not _is_causal_module(module):
        return None
    family = module.config.model_type
    if family not in FAMILIES:
        raise SourceError(
            f"The factory '{source}' returns a {type(module).__name__} (family '{family}'), which adapter "
            "cannot export with a KV cache yet.",
            f"Supported families: {', '.join(FAMILIES)}.",
        )
    return CausalLM(module.eval(), family, source, "factory", getattr(module, "tokenizer", None))


def load_causal_lm(folder: Path | str) -> CausalLM:
    """Load a Hugging Face causal LM folder offline from safetensors (no remote code).

    Raises:
        SourceError: No config, or a family adapter does not export.
        UnsafeSourceError: No safetensors weights (pickled checkpoints are never opened).
    """
    transformers = _transformers()
    folder = Path(folder)
    config = _config_json(folder)
    if config is None:
        raise SourceError(f"Folder '{folder}' has no readable config.json, so it is not a Hugging Face model folder.")
    family = family_of_config(config)
    if family is None:
        raise SourceError(
            f"'{folder}' is a {', '.join(config.get('architectures') or ['?'])} (model_type "
            f"'{config.get('model_type')}'), which adapter cannot export with a KV cache yet.",
            f"Supported families: {', '.join(FAMILIES)}.",
        )
    if not list(folder.glob("*.safetensors")):
        raise UnsafeSourceError(
            f"Folder '{folder}' has no safetensors weights.",
            "adapter loads Hugging Face weights only from safetensors; pickled checkpoints are never opened.",
        )
    transformers.utils.logging.disable_progress_bar()
    with safety.weights_only_loads():
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(folder),
                local_files_only=True,
                use_safetensors=True,
                trust_remote_code=False,
                attn_implementation="eager",
                dtype=torch.float32,
            )
        except Exception as exc:
            raise SourceError(f"transformers could not load '{folder}': {str(exc).splitlines()[0][:300]}") from exc
    tokenizer = None
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception:  # a model without a usable tokenizer still generates from token ids
            tokenizer = None
    return CausalLM(model.eval(), family, str(folder), "huggingface-folder", tokenizer)


def tiny_config(family: str, **overrides: Any):
    """A tiny random-weight config of ``family`` (2 layers, hidden 64, GQA 4:2 where it has GQA)."""
    transformers = _transformers()
    if family not in FAMILIES:
        raise SourceError(f"Unknown decoder family '{family}'.", f"Known: {', '.join(FAMILIES)}.")
    cls = getattr(transformers, FAMILIES[family])
    if family == "gpt2":
        base = {"vocab_size": 128, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}
        base.update(bos_token_id=1, eos_token_id=2)
    elif family == "falcon":
        base = {k: v for k, v in _TINY.items() if k not in ("intermediate_size", "num_key_value_heads")}
        base.update(num_kv_heads=2, new_decoder_architecture=True, alibi=False)
    else:
        base = dict(_TINY, **_TINY_EXTRA.get(family, {}))
    base.update(overrides)
    return cls(**base)


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random causal LM of ``family`` (fixed seed), eval mode, eager attention."""
    transformers = _transformers()
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


def write_word_tokenizer(folder: Path | str, vocab: int) -> Path:
    """Save a word-level tokenizer over ``vocab`` made-up words in ``folder``: ``<unk>`` 0,
    ``<s>`` 1, ``</s>`` 2, then ``w3`` ... ``w{vocab-1}`` (text ``"w5 w9"`` is ids 5, 9).

    Random models have no real tokenizer and none may be downloaded; text prompts and the
    peers' converters (ONNX Runtime GenAI's builder) need one.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    transformers = _transformers()
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    core = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    wrapped.save_pretrained(str(folder))
    return Path(folder)


def write_random_folder(config, folder: Path | str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write a random-weight causal LM of ``config`` as a Hugging Face folder (safetensors).

    Used by the benchmarks (a TinyLlama-1.1B-shaped model) and the tests; weights are
    initialised by transformers' own init under ``seed``.
    """
    transformers = _transformers()
    folder = Path(folder)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    config.architectures = [type(model).__name__]
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def write_random_shards(
    config, folder: Path | str, seed: int = 0, shard_bytes: int = 1 << 30, bf16: bool = False
) -> Path:
    """Write a random causal LM of ``config`` as a Hugging Face folder of safetensors shards
    (FP32, or BF16 with ``bf16``), holding one shard in memory at a time (models larger than
    this process's memory).

    Matrices are N(0, 0.02) like transformers' init, norm weights ones and biases zeros; the
    names and shapes are the model's own (read from it on the meta device).
    """
    from safetensors.torch import save_file

    transformers = _transformers()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(folder))
    rng = np.random.default_rng(seed)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    count, size = 0, 0

    def flush() -> None:
        nonlocal shard, count, size
        if shard:
            name = f"model-{count:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update({key: name for key in shard})
            shard, count, size = {}, count + 1, 0

    for key, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        if len(shape) >= 2:
            array = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        elif key.endswith("bias"):
            array = np.zeros(shape, np.float32)
        else:
            array = np.ones(shape, np.float32)
        shard[key] = torch.from_numpy(array).to(torch.bfloat16 if bf16 else torch.float32)
        size += shard[key].nbytes
        if size >= shard_bytes:
            flush()
    flush()
    width = 2 if bf16 else 4
    index = {"metadata": {"total_size": sum(int(np.prod(t.shape)) * width for t in model.state_dict().values())},
             "weight_map": weight_map}  # fmt: skip
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder
