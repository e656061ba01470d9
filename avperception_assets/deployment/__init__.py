"""Deployment: ONNX export of a checkpoint, checked against PyTorch with onnxruntime."""
