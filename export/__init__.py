"""ONNX export of bitvit models, and the ONNX Runtime ops that run packed ternary, binary, int4 and int8 layers."""
