"""gradscope's Triton kernels (installed as ``gradscope.kernels``).

Each module holds one operation: its ``@triton.jit`` kernels, then the launcher that
checks inputs, allocates and launches. Users call :func:`gradscope.grad_stats`; nothing
here is imported until a Triton backend is used, so ``import gradscope`` works without
Triton.
"""
