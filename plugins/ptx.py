"""Which PTX ISA version the selection kernel embedded in TensorRT engines declares.

TensorRT stores the AOT plugin's PTX in the engine and the CUDA driver JIT-compiles it when the engine loads.
A driver refuses PTX newer than its own CUDA version knows, and does so only then, at run time. Triton 3.9
declares the newest ISA it knows (9.4, CUDA 13.4 drivers) unless told otherwise, so the version is chosen
here: the installed driver's, where one can be read; else 8.4 (every CUDA 12.4+ driver), which is what
ahead-of-time builds and tests get; or what the user asks for with --ptx-version.
"""
from __future__ import annotations

import ctypes
import subprocess

from ..errors import UsageError

DEFAULT = 84                      # PTX ISA 8.4: CUDA 12.4 and newer drivers
OLDEST, NEWEST = 80, 94           # the range of ISAs Triton 3.9 emits
_ARCH_MINIMUM = {100: 86, 101: 86, 103: 88, 120: 87, 121: 88}     # architectures that need more than 8.0


def for_cuda(major: int, minor: int) -> int:
    """The newest PTX ISA (as 84 for 8.4) that a driver of CUDA major.minor loads."""
    if major >= 13:
        return 90 + 10 * (major - 13) + minor
    if major == 12:
        return 80 + minor if minor <= 5 else 80 + minor - 1      # 12.6 stayed at 8.5; 12.8 is 8.7
    if major == 11:
        return 70 + minor
    return 0


def building_gpu() -> int:
    """The compute capability of this machine's GPU as Triton names it (90 for sm_90): what TensorRT builds
    the engine for."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def driver_cuda() -> tuple[int, int] | None:
    """The CUDA version of the installed driver (libcuda), or None where there is no driver."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value > 0:
            return version.value // 1000, version.value % 1000 // 10
    return None


def compiler_newest(capability: int) -> int:
    """The newest ISA Triton's own ptxas for this architecture assembles (Triton 3.9: 8.8 below sm_90, where
    it uses its older ptxas, and 9.4 from sm_90); triton.compile assembles the PTX even though TensorRT only
    embeds it."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        major, minor = (int(v) for v in get_ptxas(capability).version.split(".")[:2])
    except (ImportError, AttributeError, OSError, ValueError, subprocess.SubprocessError):
        return NEWEST
    return min(for_cuda(major, minor), NEWEST)


def minimum(capability: int) -> int:
    """The oldest ISA a Triton kernel for this architecture can declare: 8.0, the oldest that Triton 3.9
    emits, or the architecture's own minimum where that is higher."""
    return _ARCH_MINIMUM.get(capability, OLDEST)


def choose(capability: int, explicit: int | None = None) -> tuple[int, str]:
    """(PTX ISA version, why) for kernels built for `capability` (90 for sm_90)."""
    low, high = minimum(capability), compiler_newest(capability)
    if explicit is not None:
        if not low <= explicit <= high:
            raise UsageError(f"--ptx-version {explicit} is outside what sm_{capability} kernels from Triton can "
                             f"declare ({low}..{high}, e.g. 84 for PTX ISA 8.4)")
        return explicit, "--ptx-version"
    cuda = driver_cuda()
    if cuda is None:
        return max(DEFAULT, low), "default: no CUDA driver to read"
    newest = for_cuda(*cuda)
    if newest < low:
        raise UsageError(f"the CUDA {cuda[0]}.{cuda[1]} driver loads PTX ISA up to {newest / 10:.1f}, but sm_"
                         f"{capability} kernels need {low / 10:.1f}; update the driver, or build with "
                         "--selection body")
    return min(newest, high), f"the installed CUDA {cuda[0]}.{cuda[1]} driver"
