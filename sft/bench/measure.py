"""Not in the book: what the benchmark measures with: wall and CPU time, peak memory, the hardware's matmul speed."""
import gc
import sys
import threading
import time

import torch



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

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_gflops(device, dtype, shape=(512, 768, 3072), seconds=1.0):
    """Matrix-product throughput (GFLOP/s) of an (m, k) @ (k, n) product (2 m k n FLOPs), by
    default the size of a gpt2-small MLP layer on a training batch: one product to warm up,
    then as many as fit in ``seconds`` (at least 3); the warm-up's own rate if it alone took
    longer than ``seconds``."""
    m, k, n = shape
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    t0 = time.perf_counter()
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    if first >= seconds:  # a slow precision here (bf16 without hardware support): one product says enough
        return round(2 * m * k * n / first / 1e9, 1)
    done, t0 = 0, time.perf_counter()
    while True:
        a @ b
        done += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and done >= 3:
            return round(2 * m * k * n * done / elapsed / 1e9, 1)


def ceiling_shapes(cfg, rows):
    """The shapes the ceiling is the best of: 2048^3 (a big square, the BLAS at its best),
    (512, 768) @ (768, 3072) (the earlier probe), and the model's own on a training batch of
    ``rows`` = B * T positions: the MLP's first product (rows, d) @ (d, 4d) and the output head
    (rows, d) @ (d, vocab)."""
    d = cfg["emb_dim"]
    return [(2048, 2048, 2048), (512, 768, 3072), (rows, d, 4 * d), (rows, d, cfg["vocab_size"])]


def gemm_ceiling(device, precisions, shapes, seconds=1.0):
    """{precision: {"best": GFLOP/s, "best_shape": "MxKxN", "shapes": {"MxKxN": GFLOP/s}}} for each
    precision ("fp32", "bf16") the paths use: what this hardware's matrix products give, measured
    in this run; the best shape's figure is the ceiling MFU divides by. fp32 on a GPU runs
    without TF32 (the chapter's setting)."""
    out = {}
    for precision in precisions:
        rates = {"x".join(map(str, s)): matmul_gflops(device, _DTYPES[precision], s, seconds) for s in shapes}
        best = max(rates, key=rates.get)
        out[precision] = {"best": rates[best], "best_shape": best, "shapes": rates}
    return out


def bench_matmul(ceiling):
    """The earlier probe's fields, from the ceiling's (512, 768, 3072) shape: fp32 and (where the
    fast path uses it) bf16 throughput, and their ratio, which bounds what bf16 can give."""
    out = {"matmul_shape": [512, 768, 3072],
           "matmul_gflops": {p: c["shapes"].get("512x768x3072") for p, c in ceiling.items()}}
    if "bf16" in ceiling and "fp32" in ceiling:
        out["matmul_bf16_over_fp32"] = round(out["matmul_gflops"]["bf16"] / out["matmul_gflops"]["fp32"], 2)
    return out


_T0 = time.perf_counter()


def log(text):
    print(f"[bench {time.perf_counter() - _T0:6.1f} s] {text}", file=sys.stderr, flush=True)
