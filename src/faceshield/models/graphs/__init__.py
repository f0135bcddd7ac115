"""Graph loaders: our own ONNX and TF.js graph-model executors in PyTorch."""
