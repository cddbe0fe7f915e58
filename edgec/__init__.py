"""edgec: an edge-deployment compiler for research compression methods, lowered with TVM and ONNX Runtime."""

__version__ = "0.1.0"
