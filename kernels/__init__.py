"""Fused GPU kernels in Triton for what the engines lack (installed as ``adapter.kernels``).

Each kernel (:class:`adapter.kernels.spec.Kernel`) carries its Triton function, a NumPy
reference, a tile-size search space and its memory-traffic model; :mod:`.tuning` ranks the
space against a GPU profile without a GPU, :mod:`.aot` compiles the chosen configuration to a
cubin (NVIDIA) or hsaco (AMD) and bundles it into an artifact, ``kernels/device_check.py``
measures them on a GPU. Under ``TRITON_INTERPRET=1`` they run on the CPU (the tests).

* ``attention`` — flash-style attention, additive mask, causal over a KV cache, GQA packed
  into the tile rows; prefill and decode.
* ``bias_gelu`` — ``gelu(x + b)``.
* ``add_layernorm`` / ``add_rmsnorm`` — residual add + LayerNorm / RMSNorm, both outputs.
* ``rotary`` — rotary embedding at ``position_ids``.
* ``int4_gemm`` — weight-only INT4 GEMM, dequantized in registers (MatMulNBits layout).
"""

from __future__ import annotations

__all__ = ["KERNELS"]

import os

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (it warns when unset)

from adapter.kernels.attention import ATTENTION  # noqa: E402
from adapter.kernels.elementwise import BIAS_GELU  # noqa: E402
from adapter.kernels.int4_gemm import INT4_GEMM  # noqa: E402
from adapter.kernels.norms import ADD_LAYERNORM, ADD_RMSNORM  # noqa: E402
from adapter.kernels.rotary import ROTARY  # noqa: E402

KERNELS = {k.name: k for k in (ATTENTION, BIAS_GELU, ADD_LAYERNORM, ADD_RMSNORM, ROTARY, INT4_GEMM)}
