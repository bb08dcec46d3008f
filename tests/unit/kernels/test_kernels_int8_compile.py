"""torch.compile keeps the int8 kernel as one op (Int8Linear's CUDA path, issue 21: `compile --precision int8` must
not trace the dequantize reference): the graph dynamo hands the backend holds worldserve.int8_matmul and no
dequantize, and the compiled call equals the reference. Runs on the CPU through the interpreter."""

import torch

from worldserve.runtime.quantize import int8_linear_reference, quantize_int8


def test_compile_keeps_the_int8_op():
    import worldserve.kernels.int8_matmul  # noqa: F401  (registers the op)

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def linear(x, q, s, b):  # what Int8Linear.forward runs on CUDA: [..., K] -> [..., N]
        return torch.ops.worldserve.int8_matmul(x.reshape(-1, x.shape[-1]), q, s, b).view(*x.shape[:-1], q.shape[0])

    g = torch.Generator().manual_seed(1)
    q, s = quantize_int8(torch.randn(40, 32, generator=g))
    x, b = torch.randn(3, 5, 32, generator=g), torch.randn(40, generator=g)
    torch._dynamo.reset()
    out = torch.compile(linear, backend=backend, fullgraph=True)(x, q, s, b)
    torch.testing.assert_close(out, int8_linear_reference(x, q, s, b), atol=1e-4, rtol=1e-5)
    (gm,) = graphs
    code = gm.code
    assert "worldserve.int8_matmul" in code and "dequantize" not in code, code
