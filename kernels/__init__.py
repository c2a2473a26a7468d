"""gradscope's Triton kernels (installed as ``gradscope.kernels``).

``grad_stats.py`` holds the statistics kernel (its ``@triton.jit`` functions and the
layouts they write); ``launch.py`` the Python that checks inputs, allocates and launches
it. Users call :func:`gradscope.grad_stats`; nothing here is imported until a Triton
backend is used, so ``import gradscope`` works without Triton.
"""
