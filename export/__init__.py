"""ONNX / TensorRT export (imported as lvmae_fast.export)."""
