"""Causal language models: export with a KV cache, generation engines, ``generate``.

Sits beside ``bench``, ``profile`` and ``runtime``: it uses the converter's exporter and
the backends' decoder builders (``Backend.DECODER``), and the CLI and ``adapter.convert``
/ ``adapter.load`` dispatch to it for causal-LM sources and artifacts.
"""
