"""Per-op data (installed as ``adapter.op_library``): FLOPs and bytes formulas, allowed
precisions and per-backend support, with a coverage matrix.

Empty in the foundation; the multi-target issue fills it. Until then backends answer
``supports`` from their own runtime's kernel registry.
"""

__all__: list[str] = []
