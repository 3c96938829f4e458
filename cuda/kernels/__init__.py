"""Triton kernels of the CUDA backend. Importing this package imports triton: only `dsv4.cuda.backend` does, lazily.

Every kernel loads its operands, upcasts them to fp32 where the Triton interpreter cannot do the arithmetic in the
storage dtype (bf16), and stores in the output tensor's dtype. Block sizes come from `_common.cfg`: one table for
H100/H200-class GPUs, a second one with large blocks for the interpreter (fewer, bigger programs run faster there).
"""
