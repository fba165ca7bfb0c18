"""Triton DSA decode kernels, capture hooks and ncu/NVML profiling (GPU side).

Importing this package does not import torch or triton; the kernel modules do.
"""
