"""The machine's matmul peak: the denominator of every MFU figure in this project.

    python -m bench.matmul_peak [--size 2048]

CPU: fp32 (bf16/fp16 are emulated on most CPUs and ~150x slower, recorded for reference at a
small size). CUDA: fp32, tf32, bf16 and fp16.
"""

from __future__ import annotations

import argparse

import torch

from bench.harness import Recorder, timeit


def gflops(n: int, dtype: torch.dtype, device: str, repeat: int = 5) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device == "cuda" else None
    seconds = timeit(lambda: a @ b, warmup=2, repeat=repeat, sync=sync)
    return 2 * n**3 / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    with Recorder("matmul_peak") as rec:
        rec.add("fp32_gflops", gflops(args.size, torch.float32, "cpu"), "GFLOP/s", device="cpu", n=args.size,
                threads=torch.get_num_threads())
        rec.add("bf16_gflops", gflops(256, torch.bfloat16, "cpu", repeat=3), "GFLOP/s", device="cpu", n=256)
        if torch.cuda.is_available():
            n = max(args.size, 8192)
            torch.backends.cuda.matmul.allow_tf32 = False
            rec.add("cuda_fp32_gflops", gflops(n, torch.float32, "cuda"), "GFLOP/s", device="cuda", n=n)
            torch.backends.cuda.matmul.allow_tf32 = True
            rec.add("cuda_tf32_gflops", gflops(n, torch.float32, "cuda"), "GFLOP/s", device="cuda", n=n)
            rec.add("cuda_bf16_gflops", gflops(n, torch.bfloat16, "cuda"), "GFLOP/s", device="cuda", n=n)
            rec.add("cuda_fp16_gflops", gflops(n, torch.float16, "cuda"), "GFLOP/s", device="cuda", n=n)


if __name__ == "__main__":
    main()
