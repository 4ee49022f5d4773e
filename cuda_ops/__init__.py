"""GPU kernels for packed low-bit ViT layers (with CPU kernels for every op, so the same model runs anywhere).

- `cuda_ops.ops`: the `torch.ops.bitvit.*` custom ops (ternary / binary / int4 / int8 weights with per-token
  int8 activations, 2/4/8-bit weight-only (W4A16), per-token activation quantization with a fused LayerNorm).
- `cuda_ops.triton_kernels`: their CUDA kernels, in Triton.
- `cuda_ops.modules`: `to_kernels(model)` swaps a quantized model's QuantLinear layers for the ops;
  `CUDAGraphModel` replays a captured CUDA graph for batch-1 latency.
- `python -m cuda_ops.bench`: per-op and end-to-end timings against bf16 cuBLAS.
- `python -m cuda_ops.parity`: a real model's quantized versions score the same on the kernels as on
  QuantLinear's reference forward.
- `python -m cuda_ops.compile_check`: every Triton tiling compiled for sm_90 without a GPU (registers,
  spills, shared memory, pipelining, MMA instructions).
- `cuda_ops/gpu_session.sh`: everything that needs the GPU (tests, benchmark, profile), for a GPU session.
"""
from cuda_ops.modules import CUDAGraphModel, KernelLinear, kernel_for, to_kernels  # noqa: F401
from cuda_ops.ops import (binary_linear, int4_linear, int8_linear, quantize_per_token,  # noqa: F401
                          ternary_b3_linear, ternary_linear, weight_only_linear)
