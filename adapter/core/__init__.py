"""The ground floor: errors, tensor specs, ONNX I/O and checks, safety checks on user
files, the engine artifact, verification against eager PyTorch, accuracy budgets and
timing. Imports nothing else of adapter's."""
