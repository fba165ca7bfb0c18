"""Set the L2 persisting access-policy window from Python (CUDA driver API through ctypes).

PyTorch and Triton expose no way to mark an address window as persisting in the L2. This
module calls the driver directly, on the current context (the one PyTorch made current):
``cuCtxSetLimit(CU_LIMIT_PERSISTING_L2_CACHE_SIZE)`` sets the L2 bytes set aside for
persisting lines, and ``cuStreamSetAttribute(CU_STREAM_ATTRIBUTE_ACCESS_POLICY_WINDOW)``
marks ``[base, base + num_bytes)`` for kernels launched on a stream: ``hit_ratio`` of its
lines (chosen by the hardware by address) persist, the rest stream. Kernels must run on that
stream (``torch.cuda.stream(s)``; Triton launches on PyTorch's current stream); the legacy
default stream takes no attributes.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager

from dsacache.errors import DsacacheError

CU_LIMIT_PERSISTING_L2_CACHE_SIZE = 0x06
CU_STREAM_ATTRIBUTE_ACCESS_POLICY_WINDOW = 1
CU_ACCESS_PROPERTY_STREAMING = 1
CU_ACCESS_PROPERTY_PERSISTING = 2
CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE = 108
CU_DEVICE_ATTRIBUTE_MAX_ACCESS_POLICY_WINDOW_SIZE = 109


class _Window(ctypes.Structure):
    _fields_ = [
        ("base_ptr", ctypes.c_void_p),
        ("num_bytes", ctypes.c_size_t),
        ("hitRatio", ctypes.c_float),
        ("hitProp", ctypes.c_int),
        ("missProp", ctypes.c_int),
    ]


class _AttrValue(ctypes.Union):  # CUstreamAttrValue: a 64-byte union
    _fields_ = [("accessPolicyWindow", _Window), ("pad", ctypes.c_char * 64)]


def _driver() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as err:
        raise DsacacheError(f"the CUDA driver (libcuda.so.1) is not available: {err}") from None


def _check(result: int, what: str) -> None:
    if result != 0:
        raise DsacacheError(f"{what} failed with CUDA driver error {result}")


def device_limits(device: int = 0) -> dict[str, int]:
    """The device's maximum persisting L2 size and access-policy window size (bytes)."""
    cuda = _driver()
    out = {}
    for name, attr in (("max_persisting_l2_bytes", CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE),
                       ("max_window_bytes", CU_DEVICE_ATTRIBUTE_MAX_ACCESS_POLICY_WINDOW_SIZE)):  # fmt: skip
        value = ctypes.c_int()
        _check(cuda.cuDeviceGetAttribute(ctypes.byref(value), attr, device), f"reading {name}")
        out[name] = value.value
    return out


@contextmanager
def persisting_window(
    stream_handle: int, base: int, num_bytes: int, hit_ratio: float, set_aside: int
) -> Iterator[None]:
    """Within the block, kernels on ``stream_handle`` (a ``cudaStream_t`` as an int, e.g.
    ``torch.cuda.Stream().cuda_stream``) see ``[base, base + num_bytes)`` as persisting with
    ``hit_ratio``, and ``set_aside`` L2 bytes are reserved for persisting lines. On exit the
    window is cleared and persisting lines are reset to normal."""
    if not 0.0 <= hit_ratio <= 1.0:
        raise DsacacheError(f"hit_ratio {hit_ratio} is outside [0, 1]")
    limits = device_limits()
    if set_aside > limits["max_persisting_l2_bytes"]:
        raise DsacacheError(
            f"set_aside {set_aside} B exceeds the device's maximum persisting L2 size "
            f"{limits['max_persisting_l2_bytes']} B"
        )
    if num_bytes > limits["max_window_bytes"]:
        raise DsacacheError(
            f"window of {num_bytes} B exceeds the device's maximum {limits['max_window_bytes']} B"
        )
    cuda = _driver()
    _check(cuda.cuCtxSetLimit(CU_LIMIT_PERSISTING_L2_CACHE_SIZE, ctypes.c_size_t(set_aside)),
           "cuCtxSetLimit(persisting L2)")  # fmt: skip
    value = _AttrValue()
    value.accessPolicyWindow = _Window(base, num_bytes, hit_ratio, CU_ACCESS_PROPERTY_PERSISTING,
                                       CU_ACCESS_PROPERTY_STREAMING)  # fmt: skip
    stream = ctypes.c_void_p(stream_handle)
    _check(cuda.cuStreamSetAttribute(stream, CU_STREAM_ATTRIBUTE_ACCESS_POLICY_WINDOW,
                                     ctypes.byref(value)), "cuStreamSetAttribute(window)")  # fmt: skip
    try:
        yield
    finally:
        value.accessPolicyWindow = _Window(0, 0, 0.0, 0, 0)
        cuda.cuStreamSetAttribute(stream, CU_STREAM_ATTRIBUTE_ACCESS_POLICY_WINDOW,
                                  ctypes.byref(value))  # fmt: skip
        cuda.cuCtxResetPersistingL2Cache()
        cuda.cuCtxSetLimit(CU_LIMIT_PERSISTING_L2_CACHE_SIZE, ctypes.c_size_t(0))
