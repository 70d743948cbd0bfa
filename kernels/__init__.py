"""Hand-written kernels for fused ops the engines lack (installed as ``adapter.kernels``).

Empty in the foundation: the Triton kernels, each with a reference implementation and
a tile-size search space, arrive with the fusion and multi-target issues.
"""

__all__: list[str] = []
