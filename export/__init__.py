"""ONNX export of bitvit models, and the ONNX Runtime ops that run packed ternary and binary layers."""
