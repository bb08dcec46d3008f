"""Triton kernels run on the CPU through Triton's interpreter: TRITON_INTERPRET must be set before a kernel
module is imported (triton.jit decides at decoration time), so it is set here, before the tests import them."""

import os

os.environ["TRITON_INTERPRET"] = "1"
