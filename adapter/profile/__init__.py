"""The per-layer profiler (``adapter profile``): each backend's per-node timings mapped to
ONNX nodes and modules, costed by the op library, placed on the target's roofline."""
