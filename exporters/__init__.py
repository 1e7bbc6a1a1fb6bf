"""Exporters: ONNX and TensorRT-ready graphs validated against the original (built in the export issue)."""
