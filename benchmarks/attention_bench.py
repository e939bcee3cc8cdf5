"""Attention alone on one packed batch of 16384 tokens (XLM-R base heads: 12 x 64, bf16), per
workload: flash-attn varlen, PyTorch varlen_attn, and the local-window SDPA used for short batches.

    python benchmarks/attention_bench.py
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend_src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from encoder_bench import draw_lengths  # noqa: E402
from loraembed.attention import (  # noqa: E402
    LOCAL_WINDOW, local_window_attention, local_window_mask, select_attention_backend, varlen_attention,
)


def median_ms(fn, repeats: int = 30) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def main() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for workload in ("queries", "passages"):
        lengths = np.array(draw_lengths(workload, 16384, rng))
        lengths = lengths[np.cumsum(lengths) <= 16384]
        if workload == "queries":
            lengths = np.minimum(lengths, LOCAL_WINDOW + 1)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.from_numpy(np.cumsum(lengths))
        cu = cu.cuda()
        total, max_len = int(lengths.sum()), int(lengths.max())
        q, k, v = (torch.randn(total, 12, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        index = torch.repeat_interleave(torch.arange(len(lengths)), torch.from_numpy(lengths)).cuda()
        for backend in ("flash_attn", "torch_varlen"):
            try:
                select_attention_backend(backend, torch.device("cuda"), torch.bfloat16)
            except Exception:
                continue
            rows.append((workload, backend, median_ms(lambda: varlen_attention(q, k, v, cu, max_len, backend))))
        if max_len <= LOCAL_WINDOW + 1:
            mask = local_window_mask(index)
            rows.append((workload, "local window (mask per batch)", median_ms(lambda: local_window_attention(q, k, v, mask))))
            rows.append((workload, "mask build", median_ms(lambda: local_window_mask(index))))
    print(f"card: {torch.cuda.get_device_name()}   date: {datetime.date.today()}   one layer's attention, 16384 tokens")
    print("| workload | kernel | ms |\n|---|---|---|")
    for workload, kernel, ms in rows:
        print(f"| {workload} | {kernel} | {ms:.3f} |")


if __name__ == "__main__":
    main()
