"""llama.cpp generation engines: the model's weights as GGUF, run by llama.cpp's own graphs.

llama.cpp brings a hand-written graph per architecture, so this builder takes the eager
model's weights and config (``SOURCE = "weights"``) rather than the exported ONNX graph:

* ``prepare`` writes an FP32 GGUF once per convert through ``gguf`` (the format's own Python writer): tensor
  names from ``gguf``'s name map of the architecture, the hyperparameters the architecture
  reads, a placeholder vocabulary of the model's size (adapter tokenizes with the bundled
  ``tokenizer.json``; llama.cpp only sees ids), and Llama/Mistral query/key rows reordered
  from Hugging Face's rotate-half layout to the adjacent pairs llama.cpp's rotary uses.
  ``build`` takes that file as the FP32 engine, or, for reduced weights, runs llama.cpp's
  own quantizer over it (``llama_model_quantize``) at each rung:
  ``int4`` is Q4_0 (block 32, one scale per block; Q4_1 with an offset when asymmetric),
  ``int8`` Q8_0, ``bf16`` BF16; an INT4 engine's embedding table, its LM head
  (``head_int8``) and the blocks the driver's widening ladder names (``int8_blocks``)
  are Q8_0.
* ``load`` maps the GGUF (llama.cpp's loader mmaps it) and ``start`` sizes one context for
  the batch (one sequence per row, ``capacity`` cells each; FP32 cache cells for FP32
  weights, F16 otherwise), reused while later batches fit, so a step only decodes: the
  rows' new tokens go in one ``llama_batch`` with their positions and sequence ids (padding
  is left out, llama.cpp masks by sequence), and the logits of every token come back.
"""

from __future__ import annotations

__all__ = ["PASSES", "SOURCE", "AUTO_KINDS", "WEIGHTS", "QUANTIZE_IN_GRAPH", "WEIGHT_DEFAULTS", "LlamaCppDecoder", "prepare", "build", "load"]

import ctypes
import importlib
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from adapter.core.errors import AdapterError, BackendUnavailableError
from adapter.core.mapped import Releaser

MODEL_FILE = "model.gguf"
F32_FILE = "model-f32.gguf"
PASSES: tuple[str, ...] = ()
SOURCE = "weights"
"""``prepare`` takes the eager model (weights and config), not an ONNX graph; ``build`` the GGUF it wrote."""
AUTO_KINDS = frozenset({"cpu"})
"""Races with the other CPU decoders where the target lists ``llamacpp``."""
WEIGHTS = frozenset({"fp32", "bf16", "int8", "int4"})
QUANTIZE_IN_GRAPH: frozenset[str] = frozenset()
WEIGHT_DEFAULTS = {"block_size": 32, "symmetric": True}
"""llama.cpp's Q4_0/Q8_0: blocks of 32 weights, one scale each."""

# GGUF architecture, and whether query/key rows are reordered for llama.cpp's rotary
_ARCHES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}
# llama.cpp's file types (llama.h ``llama_ftype``) and tensor types (ggml.h ``ggml_type``)
_FTYPE = {"fp32": 0, "bf16": 32, "int8": 7, ("int4", True): 2, ("int4", False): 3}
_Q8_0 = 8


def _module(name: str):
    """llama-cpp-python (``llama_cpp``) or ``gguf``, or the error naming the extra."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"The llama.cpp backend needs the {name} package.", "Install it: pip install -e '.[llamacpp]'."
        ) from exc


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    if scaling not in ("default", None):
        raise AdapterError(f"The llama.cpp backend does not map rotary scaling '{scaling}' yet.")
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(config, "rope_theta", 10000.0))


def _adjacent_pairs(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from rotate-half order (i, i + d/2) to interleaved pairs (2i, 2i + 1)."""
    rows = weight.shape[0] // heads
    return weight.reshape(heads, 2, rows // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model: Any, family: str, layout: Any, path: Path) -> None:
    """The eager model's FP32 weights and hyperparameters as a GGUF file llama.cpp loads.

    Raises:
        AdapterError: A family (or rotary scaling) this writer does not map.
    """
    if family not in _ARCHES:
        raise AdapterError(
            f"The llama.cpp backend maps {', '.join(sorted(_ARCHES))} models, not '{family}'.",
            "Use --backend onnxruntime or openvino for this model.",
        )
    gguf = _module("gguf")
    arch, reorder = _ARCHES[family]
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(layout.max_positions)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(layout.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_file_type(0)
    writer.add_vocab_size(layout.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([f"<id{i}>".encode() for i in range(layout.vocab_size)])
    writer.add_token_scores([0.0] * layout.vocab_size)
    writer.add_token_types([1] * layout.vocab_size)  # normal tokens: ids in, ids out
    if layout.bos_token_id is not None:
        writer.add_bos_token_id(layout.bos_token_id)
    if layout.eos_token_ids:
        writer.add_eos_token_id(layout.eos_token_ids[0])
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), layout.num_layers)
    unmapped = []
    for key, tensor in model.state_dict().items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            if not key.endswith("rotary_emb.inv_freq"):
                unmapped.append(key)
            continue
        array = tensor.detach().float().numpy()
        if reorder and key.endswith("q_proj.weight"):
            array = _adjacent_pairs(array, heads)
        elif reorder and key.endswith("k_proj.weight"):
            array = _adjacent_pairs(array, kv_heads)
        writer.add_tensor(name, np.ascontiguousarray(array))
    if unmapped:
        raise AdapterError(f"The llama.cpp backend has no GGUF name for {', '.join(unmapped[:6])}.")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _quantize(source: Path, target: Path, settings: dict[str, Any]) -> None:
    """llama.cpp's quantizer: the file type of ``settings["weights"]``, Q8_0 where widened."""
    llama_cpp = _module("llama_cpp")
    _quiet(llama_cpp)
    weights = settings["weights"]
    if weights == "int4" and int(settings.get("block_size", 32)) != 32:
        raise AdapterError(
            f"llama.cpp's 4-bit blocks hold 32 weights, not {settings['block_size']}.", "Use --group-size 32."
        )
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _FTYPE[(weights, bool(settings.get("symmetric", True)))] if weights == "int4" else _FTYPE[weights]
    params.nthread = int(settings.get("threads", 1)) or 1
    blocks = [int(b) for b in settings.get("int8_blocks", ())] if weights == "int4" else []
    if weights == "int4":
        params.token_embedding_type = _Q8_0  # as ONNX Runtime's engines keep it wide: one row read per token
        if settings.get("head_int8", True):
            params.output_tensor_type = _Q8_0
    # one (pattern, type) override and the NUL entry that ends the list; alive until the call returns
    overrides = (llama_cpp.llama_model_tensor_override * 2)()
    if blocks:
        overrides[0].pattern = rf"blk\.({'|'.join(map(str, blocks))})\.".encode()
        overrides[0].type = _Q8_0
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise AdapterError(f"llama.cpp's quantizer failed to write {weights} weights.")


def prepare(model: Any, layout: Any, folder: Path) -> Path:
    """The FP32 GGUF of the eager weights (``model``: the CausalLM), written once into
    ``folder``: each rung's ``build`` quantizes this file, and the eager model can be let go
    before any engine loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / F32_FILE
    write_gguf(model.model, model.family, layout, path)
    return path


def build(model: Any, layout: Any, workdir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Write ``model.gguf``: the FP32 GGUF ``prepare`` wrote (``model`` is its path; a
    CausalLM is prepared here first), through llama.cpp's quantizer for reduced weights."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    target = workdir / MODEL_FILE
    scratch = None if isinstance(model, Path) else workdir / ".f32"
    source = model if scratch is None else prepare(model, layout, scratch)
    try:
        if settings["weights"] != "fp32":
            _quantize(source, target, settings)
        else:
            try:  # the prepared file, under a second name (no copy of 4 GB)
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return {"model_file": MODEL_FILE, "files": [MODEL_FILE], "kv_cache": "llama.cpp", **settings}


class LlamaCppDecoder:
    """A llama.cpp model and one context sized for the running batch."""

    def __init__(self, folder: Path, config: dict[str, Any], layout: Any) -> None:
        llama_cpp = _module("llama_cpp")
        self.lib = llama_cpp
        path = Path(folder) / config["model_file"]
        if not path.is_file():
            raise AdapterError(f"The llama.cpp engine file '{path}' is missing.")
        llama_cpp.llama_backend_init()
        _quiet(llama_cpp)
        params = llama_cpp.llama_model_default_params()  # mmap; weights repacked for this CPU's kernels
        # the repacked weights are llama.cpp's own copy: the mapped file's pages are handed
        # back while it loads (the ones it uses as they are page back in)
        with Releaser(path):
            self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise AdapterError(f"llama.cpp could not load '{path}'.", "Rebuild the engine with adapter convert.")
        self.layout = layout
        self.threads = int(config.get("threads", 1)) or 1
        self.fp32 = config.get("weights") == "fp32"
        self.ctx = None
        self.rows = self.cells = self.tokens = 0
        self.batch = None
        self.batch_size = 0

    def _context(self, rows: int, cells: int) -> None:
        lib = self.lib
        self.close_context()
        params = lib.llama_context_default_params()
        params.n_ctx = -(-rows * cells // 256) * 256  # llama.cpp pads contexts to 256 cells
        params.n_seq_max = rows
        params.n_batch = params.n_ctx  # a prefill may fill every row's cells in one step
        params.n_ubatch = min(512, params.n_ctx)
        params.n_threads = params.n_threads_batch = self.threads
        if self.fp32:  # FP32 cache cells and the unfused attention: FP32 end to end
            params.type_k = params.type_v = 0
            params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise AdapterError(f"llama.cpp could not create a context of {rows} x {cells} positions.")
        self.rows, self.cells = rows, lib.llama_n_ctx(self.ctx) // rows
        self.tokens = lib.llama_n_batch(self.ctx)

    def start(self, batch: int, capacity: int) -> None:
        fits = self.ctx is not None and batch <= self.rows and capacity <= self.cells
        if not fits or batch * capacity > self.tokens:
            self._context(batch, capacity)
        else:
            self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def _tokens(self, count: int):
        if count > self.batch_size:
            if self.batch is not None:
                self.lib.llama_batch_free(self.batch)
            self.batch, self.batch_size = self.lib.llama_batch_init(count, 0, 1), count
        return self.batch

    def step(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, last_only: bool = False
    ) -> np.ndarray:
        rows, length = input_ids.shape
        if self.ctx is None or rows > self.rows:
            raise AdapterError("The llama.cpp decoder's step came before start() sized its context.")
        live = attention_mask[:, -length:].astype(bool)
        where = np.argwhere(live)  # (row, column) of every real token, row-major
        batch = self._tokens(len(where))
        lib = self.lib
        batch.n_tokens = len(where)
        np.ctypeslib.as_array(batch.token, (len(where),))[:] = input_ids[live]
        np.ctypeslib.as_array(batch.pos, (len(where),))[:] = position_ids[live]
        np.ctypeslib.as_array(batch.n_seq_id, (len(where),))[:] = 1
        wanted = np.ones(len(where), np.int8)
        if last_only:  # each row's last token only: the LM head skips the other positions
            wanted[:] = 0
            wanted[np.flatnonzero(np.r_[where[1:, 0] != where[:-1, 0], True])] = 1
        np.ctypeslib.as_array(batch.logits, (len(where),))[:] = wanted
        for i, row in enumerate(where[:, 0]):
            batch.seq_id[i][0] = int(row)
        code = lib.llama_decode(self.ctx, batch)
        if code != 0:
            raise AdapterError(f"llama.cpp failed in a decoder step (llama_decode returned {code}).")
        vocab = self.layout.vocab_size
        got = np.ctypeslib.as_array(lib.llama_get_logits(self.ctx), (int(wanted.sum()), vocab))
        if last_only:  # every row has a live last token (left padding)
            return got.reshape(rows, 1, vocab).copy()
        out = np.zeros((rows, length, vocab), np.float32)
        out[live] = got
        return out

    def close_context(self) -> None:
        if self.ctx is not None:
            self.lib.llama_free(self.ctx)
            self.ctx = None

    def __del__(self) -> None:
        lib = getattr(self, "lib", None)
        if lib is None:
            return
        if getattr(self, "batch", None) is not None:
            lib.llama_batch_free(self.batch)
        self.close_context()
        if getattr(self, "model", None):
            lib.llama_model_free(self.model)


_LOG_CALLBACK = None


def _quiet(llama_cpp) -> None:
    """llama.cpp's log lines off stderr unless ``ADAPTER_LLAMACPP_LOG`` is set."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None and not os.environ.get("ADAPTER_LLAMACPP_LOG"):
        _LOG_CALLBACK = llama_cpp.llama_log_callback(lambda level, text, user: None)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p())


def load(folder: Path, config: dict[str, Any], layout: Any) -> LlamaCppDecoder:
    return LlamaCppDecoder(folder, config, layout)
