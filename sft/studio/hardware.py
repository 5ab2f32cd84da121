"""What this machine can do: which device to train on and whether bf16 is fast there.

Not in the book: the chapter picks ``cuda`` if available, else ``cpu`` (and ``mps`` in its
notes), and always trains in fp32. Here the trainer also asks whether bf16 matrix products
run natively, since bf16 autocast roughly halves the time per step where they do.
"""
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import os

import torch

PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")  # "cuda:1" etc. are accepted too


def resolve_device(device="auto"):
    """``"auto"`` -> the best available device (cuda, then mps, then cpu) as a torch.device."""
    if isinstance(device, torch.device):
        return device
    name = str(device or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU here")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} asked for, but MPS is not available here")
    return dev


def device_key(device):
    """A file-name-safe name for a device, used for the one-training-per-device lock ("cpu", "cuda0")."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return f"cuda{dev.index if dev.index is not None else torch.cuda.current_device()}"
    return dev.type


@lru_cache(maxsize=1)
def cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo (empty set where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_fast_bf16():
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX), so autocast pays off."""
    flags = cpu_flags()
    if {"avx512_bf16", "amx_bf16"} & flags:
        return True
    # torch's own view (e.g. where /proc/cpuinfo is missing); private, so guarded
    probe = getattr(torch._C, "_cpu", None)
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(probe, name, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # pragma: no cover - private API may change
            pass
    return False


def bf16_is_fast(device):
    """Whether bf16 autocast is worth it on ``device`` (CUDA with bf16 support, or a bf16-capable CPU)."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        return cpu_has_fast_bf16()
    return False  # mps: bf16 support varies by OS version; stay in fp32


def resolve_precision(precision, device):
    """``"auto"`` -> ``"bf16"`` where :func:`bf16_is_fast`, else ``"fp32"``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    return precision


@contextmanager
def tf32(device, enabled=True):
    """TF32 matrix products (fp32 inputs, ~10 mantissa bits) on NVIDIA GPUs, inside the block only.

    A no-op elsewhere. The previous settings come back afterwards, so one process can time a
    path with TF32 beside one without (the benchmark does).
    """
    if resolve_device(device).type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def peak_memory_mb(device):
    """The most memory this process has used so far: CUDA's peak allocation, else the peak resident
    set size (RSS) of the process (Linux and macOS)."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)
    except (ImportError, OSError):  # pragma: no cover - Windows
        return None


def keep_freed_memory():
    """Not in the book: have glibc's malloc keep freed memory for reuse (Linux; process-wide).

    PyTorch takes big CPU tensors (gradients, logits: tens to hundreds of MB) from malloc, which
    maps fresh pages for each and unmaps them on free, so every training step page-faults them
    in again: about 15% of a bf16 gpt2-small step's CPU time here. With M_MMAP_MAX = 0 they come
    from the heap, and a high M_TRIM_THRESHOLD keeps the freed heap for the next step (the
    process then holds its peak memory). For training processes; returns True if applied.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("SFT_KEEP_FREED_MEMORY") == "0":
        return False  # SFT_KEEP_FREED_MEMORY=0: malloc's defaults (peak RSS then follows live tensors closely)
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt  # glibc; musl has none
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def device_summary():
    """A dict for the app's home page: device, its name and memory, bf16 and CPU capability."""
    dev = resolve_device("auto")
    info = {
        "device": dev.type,
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16": cpu_has_fast_bf16(),
        "bf16": bf16_is_fast(dev),
        "torch": torch.__version__,
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["name"] = props.name
        info["memory_gb"] = round(props.total_memory / 2**30, 1)
    else:
        import os
        import platform

        info["name"] = _cpu_model() or platform.processor() or platform.machine()
        info["cpu_count"] = os.cpu_count()
    return info


def _cpu_model():
    """The CPU's marketing name on Linux ("Intel(R) Xeon(R) ..."); platform.processor() is empty there."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
