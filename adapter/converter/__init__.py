"""The convert driver: import a source (torch.export, ONNX files), run the passes, build
and race the backends' engines, lower precision under a budget, pre-flight checks and the
op-coverage matrix. Imports passes/, backends/, op_library/, profiles/ and core/."""
