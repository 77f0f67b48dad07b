"""A trained model in use: the PyTorch predictor and `instanas.load`, `instanas export` (one
ONNX graph), the torch-free runtime, `instanas predict` and export validation."""
