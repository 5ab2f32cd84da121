"""Not in the book: what the benchmark measures with: wall and CPU time, peak memory, the hardware's matmul speed."""
import gc
import sys
import threading
import time

import torch

from ..studio.hardware import resolve_precision


class Meter:
    """Wall and CPU seconds of a block, and its peak memory (RSS sampled; CUDA max allocated)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        self.peak_rss = self._proc.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def _sample(self):
        while not self._done.wait(0.02):
            self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu
        self._done.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
        self.cuda_peak = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else None
        return False

    def report(self):
        out = {"seconds": round(self.wall, 3), "cpu_seconds": round(self.cpu, 3),
               "peak_rss_mb": round(self.peak_rss / 2**20, 1)}
        if self.cuda_peak is not None:
            out["cuda_max_allocated_mb"] = round(self.cuda_peak / 2**20, 1)
        return out




def release_memory():
    """Free what the previous measurement left, so the next one's peak RSS is its own."""
    gc.collect()
    try:  # glibc keeps freed heap pages mapped; hand them back to the OS (Linux only)
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ============================================================================ the hardware's ceiling

def matmul_gflops(device, dtype, shape=(512, 768, 3072), seconds=1.0):
    """Matrix-product throughput (GFLOP/s) of an (m, k) @ (k, n) product, the size of a
    gpt2-small MLP layer on a training batch: what the hardware gives each precision here."""
    m, k, n = shape
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    done, t0 = 0, time.perf_counter()
    while True:
        a @ b
        done += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and done >= 3:
            return round(2 * m * k * n * done / elapsed / 1e9, 1)


def bench_matmul(device):
    """fp32 and (where the fast path uses it) bf16 throughput, and their ratio: the fast path's
    matrix products cannot beat the latter (on this CPU: Zen 4, AVX512-BF16, no AMX: ~2.2x)."""
    out = {"matmul_shape": [512, 768, 3072], "matmul_gflops": {"fp32": matmul_gflops(device, torch.float32)}}
    if resolve_precision("auto", device) == "bf16":
        out["matmul_gflops"]["bf16"] = matmul_gflops(device, torch.bfloat16)
        out["matmul_bf16_over_fp32"] = round(out["matmul_gflops"]["bf16"] / out["matmul_gflops"]["fp32"], 2)
    return out


def log(text):
    print(f"[bench] {text}", file=sys.stderr, flush=True)
