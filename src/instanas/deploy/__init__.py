"""A trained model in use: the PyTorch predictor and `instanas.load`, export to ONNX or
TorchScript, the torch-free runtime, `instanas predict` and export validation."""
