"""Backends that turn flattened tensors into statistics rows (see ``gradscope.layout``).

``numpy_backend`` runs anywhere; ``triton_backend`` launches ``gradscope.kernels`` on CUDA
tensors (or on CPU tensors in Triton's interpreter).
"""
