"""fp8 weights as ONNX Q/DQ: one op that dequantizes a float8_e4m3fn weight per output channel.

    dequantize_fp8(weight_f8 float8_e4m3fn [N, K], scale fp32 [N]) -> fp32 [N, K]

Eager and torch.compile: weight_f8.float() * scale[:, None] (Fp8Linear's reference). ONNX export (onnx_backend,
opset 19): DequantizeLinear(weight_f8, scale, axis=0), the Q/DQ form TensorRT turns into FP8 kernels; the
plain upcast would export as Cast(float8 -> float), which TensorRT's Cast does not take.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("worldserve::dequantize_fp8", mutates_args=())
def dequantize_fp8(weight_f8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return weight_f8.float() * scale[:, None].float()


@dequantize_fp8.register_fake
def _(weight_f8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty(weight_f8.shape, dtype=torch.float32, device=weight_f8.device)


def _dequantize_fp8_onnx(weight_f8, scale):
    from onnxscript import opset19 as op

    return op.DequantizeLinear(weight_f8, scale, axis=0)


def onnx_translations() -> dict:
    """custom_translation_table entries for torch.onnx.export(dynamo=True)."""
    return {torch.ops.worldserve.dequantize_fp8.default: _dequantize_fp8_onnx}
