"""Launch settings of the LoRA kernels, swept on one GPU: the shrink and the Q/K/V expand
(`lora/sgmv_triton.py`) and the two consumer kernels that add the deferred expand (`fused_ops.py`:
GELU + LoRA on [T, 3072], residual + LayerNorm + LoRA on [T, 768]), over one packed batch of
16,384 tokens cut into 64 rank-16 adapter segments (the engine's layout: rows grouped by slot).
The settings the code uses today are the first row of each kernel, measured in the same run, and
so are the plain kernels without LoRA (cuBLAS-free: F.gelu and the residual + LayerNorm kernel),
which bound what a fused kernel can reach.

    python benchmarks/lora_kernel_sweep.py [--tokens 16384] [--adapters 64] [--rank 16] [--out FILE.md]

Prints a table (card, date; microseconds per call, median of triton.testing.do_bench) last.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import sys
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend_src"))

from loraembed import fused_ops  # noqa: E402
from loraembed.lora import sgmv_triton  # noqa: E402
from loraembed.lora.sgmv_triton import BLOCK_T, build_lora_batch_tables  # noqa: E402
from loraembed.packing import AdapterSegment  # noqa: E402

HIDDEN, INTERMEDIATE = 768, 3072


def segments_of(tokens: int, adapters: int) -> tuple[AdapterSegment, ...]:
    cuts = torch.linspace(0, tokens, adapters + 1).round().long().tolist()
    return tuple(AdapterSegment(slot + 1, start, end) for slot, (start, end) in enumerate(zip(cuts, cuts[1:])))


def microseconds(function) -> float:
    return triton.testing.do_bench(function, warmup=25, rep=200, return_mode="median") * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    device, dtype, tokens, rank, slots = torch.device("cuda"), torch.bfloat16, args.tokens, args.rank, args.adapters + 1
    table, token_slots = build_lora_batch_tables(segments_of(tokens, args.adapters), device, with_token_slots=True)
    x = torch.randn(tokens, HIDDEN, device=device, dtype=dtype)
    wide = torch.randn(tokens, INTERMEDIATE, device=device, dtype=dtype)
    residual = torch.randn_like(x)
    norm_weight, norm_bias = torch.randn(HIDDEN, device=device, dtype=dtype), torch.randn(HIDDEN, device=device, dtype=dtype)
    a_qkv = torch.randn(slots, 3 * rank, HIDDEN, device=device, dtype=dtype) * 0.02
    b_qkv = torch.randn(slots, 3 * HIDDEN, rank, device=device, dtype=dtype) * 0.02
    b_wide = torch.randn(slots, INTERMEDIATE, rank, device=device, dtype=dtype) * 0.02
    b_narrow = torch.randn(slots, HIDDEN, rank, device=device, dtype=dtype) * 0.02
    shrunk_qkv = torch.randn(tokens, 3 * rank, device=device)
    shrunk = torch.randn(tokens, rank, device=device)
    qkv_out = torch.randn(tokens, 3 * HIDDEN, device=device, dtype=dtype)
    blocks = table.shape[0]
    rows: list[tuple[str, str, float]] = []

    # Shrink (Q/K/V: 48 ranks over 768 inputs; output.dense: 16 ranks over 3072 inputs).
    a_wide = torch.randn(slots, rank, INTERMEDIATE, device=device, dtype=dtype) * 0.02
    for name, source, a in (("shrink qkv", x, a_qkv), ("shrink output.dense", wide, a_wide)):
        rank_total = a.shape[1]
        out = torch.empty(tokens, rank_total, device=device)
        current_r = min(64, max(16, triton.next_power_of_2(rank_total)))
        settings = [(current_r, sgmv_triton.SHRINK_BLOCK_K, 4, 3)] + [
            (block_r, block_k, warps, stages)
            for block_r, block_k, warps, stages in itertools.product((16, 32, 64), (64, 128), (4, 8), (2, 3, 4))
            if block_r <= max(16, triton.next_power_of_2(rank_total))
        ]
        for index, (block_r, block_k, warps, stages) in enumerate(dict.fromkeys(settings)):
            def run(block_r=block_r, block_k=block_k, warps=warps, stages=stages, source=source, a=a, out=out):
                sgmv_triton._sgmv_shrink_kernel[(blocks, triton.cdiv(a.shape[1], block_r))](
                    source, a, out, table, source.shape[1], a.shape[1],
                    source.stride(0), a.stride(0), a.stride(1), out.stride(0),
                    BLOCK_T=BLOCK_T, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
                )
            try:
                rows.append((name, f"{'current ' if index == 0 else ''}BLOCK_R={block_r} BLOCK_K={block_k} warps={warps} stages={stages}", microseconds(run)))
            except Exception as error:  # out of shared memory, registers
                print(f"{name} {block_r},{block_k},{warps},{stages}: {type(error).__name__}", file=sys.stderr)

    # Q/K/V expand into the fused projection's output (read-modify-write).
    for index, (block_n, warps, stages) in enumerate(dict.fromkeys([(128, 4, 3)] + list(itertools.product((64, 128, 256), (4, 8), (1, 2, 3))))):
        def run(block_n=block_n, warps=warps, stages=stages):
            sgmv_triton._sgmv_expand_kernel[(blocks, 3 * HIDDEN // block_n)](
                shrunk_qkv, b_qkv, qkv_out, table, 3 * HIDDEN, rank, HIDDEN,
                shrunk_qkv.stride(0), b_qkv.stride(0), b_qkv.stride(1), qkv_out.stride(0),
                BLOCK_T=BLOCK_T, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(rank)), num_warps=warps, num_stages=stages,
            )
        try:
            rows.append(("expand qkv", f"{'current ' if index == 0 else ''}BLOCK_N={block_n} warps={warps} stages={stages}", microseconds(run)))
        except Exception as error:
            print(f"expand {block_n},{warps},{stages}: {type(error).__name__}", file=sys.stderr)

    # GELU + LoRA over the intermediate output, in place as the layer runs it.
    launch = fused_ops.LORA_ACTIVATION_LAUNCH
    current_activation = (launch["BLOCK_T"], launch["BLOCK_N"], fused_ops.LORA_RANK_CHUNK, launch["num_warps"], launch["num_stages"])
    rows.append(("gelu + lora", "plain F.gelu, no LoRA (bound)", microseconds(lambda: torch.nn.functional.gelu(wide))))
    for index, (block_t, block_n, block_r, warps, stages) in enumerate(dict.fromkeys(
        [current_activation] + list(itertools.product((32, 64, 128), (64, 128, 256), (16,), (4, 8), (1, 2)))
    )):
        def run(block_t=block_t, block_n=block_n, block_r=block_r, warps=warps, stages=stages):
            fused_ops._add_lora_activation_kernel[(triton.cdiv(tokens, block_t), triton.cdiv(INTERMEDIATE, block_n))](
                wide, shrunk, b_wide, token_slots, wide, tokens, INTERMEDIATE, rank,
                wide.stride(0), shrunk.stride(0), b_wide.stride(0), b_wide.stride(1), wide.stride(0),
                ACTIVATION=1, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=warps, num_stages=stages,
            )
        try:
            rows.append(("gelu + lora", f"{'current ' if index == 0 else ''}BLOCK_T={block_t} BLOCK_N={block_n} warps={warps} stages={stages}", microseconds(run)))
        except Exception as error:
            print(f"gelu {block_t},{block_n},{warps},{stages}: {type(error).__name__}", file=sys.stderr)

    # Residual + LayerNorm + LoRA over a [T, 768] output.
    rows.append(("layernorm + lora", "plain residual + LayerNorm kernel, no LoRA (bound)",
                 microseconds(lambda: fused_ops.add_layer_norm(x, residual, norm_weight, norm_bias, 1e-5))))
    out = torch.empty_like(x)
    for index, (rows_per, block_r, warps, stages) in enumerate(dict.fromkeys(
        [(fused_ops.ROWS_PER_LORA_NORM, fused_ops.LORA_RANK_CHUNK, *fused_ops.LORA_LAYER_NORM_LAUNCH.values())] + list(itertools.product((16, 32, 64), (16,), (4, 8, 16), (1, 2)))
    )):
        def run(rows_per=rows_per, block_r=block_r, warps=warps, stages=stages):
            fused_ops._add_lora_layer_norm_kernel[(triton.cdiv(tokens, rows_per),)](
                x, residual, norm_weight, norm_bias, shrunk, b_narrow, token_slots, out,
                tokens, HIDDEN, rank, 1e-5, shrunk.stride(0), b_narrow.stride(0), b_narrow.stride(1),
                BLOCK=triton.next_power_of_2(HIDDEN), ROWS=rows_per, BLOCK_R=block_r, num_warps=warps, num_stages=stages,
            )
        try:
            rows.append(("layernorm + lora", f"{'current ' if index == 0 else ''}ROWS={rows_per} warps={warps} stages={stages}", microseconds(run)))
        except Exception as error:
            print(f"layernorm {rows_per},{warps},{stages}: {type(error).__name__}", file=sys.stderr)

    card = torch.cuda.get_device_name()
    lines = [f"card: {card}   date: {datetime.date.today().isoformat()}   torch {torch.__version__}   triton {triton.__version__}",
             f"{tokens} tokens, {args.adapters} adapters of rank {rank} in {blocks} blocks", "",
             "| kernel | settings | µs | vs current |", "|---|---|---:|---:|"]
    current = {}
    for kernel, setting, time_us in rows:
        if setting.startswith("current"):
            current[kernel] = time_us
    for kernel in dict.fromkeys(kernel for kernel, _, _ in rows):
        measured = sorted((row for row in rows if row[0] == kernel), key=lambda row: row[2])
        shown = [row for row in measured if "current" in row[1] or "bound" in row[1]] + [
            row for row in measured if "current" not in row[1] and "bound" not in row[1]][:5]
        for _, setting, time_us in sorted(shown, key=lambda row: row[2]):
            lines.append(f"| {kernel} | {setting} | {time_us:.1f} | {time_us / current[kernel]:.2f} |")
    text = "\n".join(lines)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
