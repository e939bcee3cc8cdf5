"""Launch settings of the LoRA kernels, swept on one GPU: the shrink and the Q/K/V expand
(`lora/sgmv_triton.py`) and the two consumer kernels that add the deferred expand (`fused_ops.py`:
GELU + LoRA on [T, 3072], residual + LayerNorm + LoRA on [T, 768]), over one packed batch of
16,384 tokens cut into 64 rank-16 adapter segments (the engine's layout: rows grouped by slot);
and the merge W + B A of one-adapter batches (`sgmv_triton.lora_merge`) over the four weight shapes
of an XLM-R base layer. The settings the code uses today are the first row of each kernel, measured
in the same run, and so are the plain kernels without LoRA (cuBLAS-free: F.gelu and the residual +
LayerNorm kernel; for the merge, a copy of W), which bound what a fused kernel can reach.

    python benchmarks/lora_kernel_sweep.py [--tokens 16384] [--adapters 64] [--rank 16]
        [--kernels shrink,expand,gelu,layernorm,merge] [--out FILE.md]

Prints a table (card, date; microseconds per call, from CUDA-graph replays: see `microseconds`) last.
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


def microseconds(function, calls: int = 10) -> float:
    """GPU microseconds per call of `function`: `calls` calls captured in one CUDA graph, the graph's
    replay timed by triton.testing.do_bench (median), divided by `calls`. A Triton launch costs the
    host 50-150 µs on a busy machine, more than many of these kernels run, so timing plain launches
    measured the host (NOTES item 36); a replay launches nothing from Python. The first call of a
    replay finds L2 flushed by do_bench, the others find their inputs as the last call left them, as
    inside a forward. Functions that cannot be captured are timed as plain launches."""
    function()  # compile and allocate outside the capture
    torch.cuda.synchronize()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            function()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                function()
    except RuntimeError as failure:
        print(f"not captured ({str(failure)[:120]}), timed as plain launches", file=sys.stderr)
        torch.cuda.synchronize()
        return triton.testing.do_bench(function, warmup=25, rep=200, return_mode="median") * 1e3
    return triton.testing.do_bench(graph.replay, warmup=10, rep=200, return_mode="median") * 1e3 / calls


def write_table(text: str, out: Path | None) -> None:
    """Print a finished table last, and also write it to `out` if given."""
    if out:
        out.write_text(text + "\n")
    print(text)


def sweep(rows: list, kernel: str, settings: list[tuple], launch, describe) -> None:
    """Time `launch(*setting)` for each setting (the first is the code's current one) into `rows`;
    settings the GPU cannot run (out of shared memory, registers) are reported on stderr."""
    for index, setting in enumerate(dict.fromkeys(settings)):
        try:
            time_us = microseconds(lambda setting=setting: launch(*setting))
        except Exception as error:
            print(f"{kernel} {setting}: {type(error).__name__}", file=sys.stderr)
            continue
        rows.append((kernel, f"{'current ' if index == 0 else ''}{describe(*setting)}", time_us))


def sweep_merge(rows: list, device: torch.device, dtype: torch.dtype, rank: int, slots: int) -> None:
    """The merge over each weight shape of an XLM-R base layer (out, in, slices)."""
    for out_features, in_features, slices in ((3 * HIDDEN, HIDDEN, 3), (HIDDEN, HIDDEN, 1),
                                              (INTERMEDIATE, HIDDEN, 1), (HIDDEN, INTERMEDIATE, 1)):
        kernel = f"merge {out_features}x{in_features}"
        width = out_features // slices
        weight = torch.randn(out_features, in_features, device=device, dtype=dtype)
        a = torch.randn(slots, slices * rank, in_features, device=device, dtype=dtype) * 0.02
        b = torch.randn(slots, out_features, rank, device=device, dtype=dtype) * 0.02
        out = torch.empty_like(weight)
        rows.append((kernel, "copy of W, no LoRA (bound)", microseconds(lambda weight=weight, out=out: out.copy_(weight))))
        rows.append((kernel, "torch.baddbmm (the reference)",
                     microseconds(lambda: sgmv_triton.merge_reference(weight, a, b, slots - 1, width, out))))

        def launch(block_m, block_n, warps, weight=weight, a=a, b=b, out=out, width=width):
            sgmv_triton._lora_merge_kernel[(weight.shape[0] // block_m, triton.cdiv(weight.shape[1], block_n))](
                weight, a, b, out, weight, slots - 1, weight.shape[0], weight.shape[1], rank, width,
                a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                SLOT_ON_DEVICE=False, BLOCK_M=block_m, BLOCK_N=block_n,
                BLOCK_R=max(16, triton.next_power_of_2(rank)), num_warps=warps,
            )

        before = (sgmv_triton._column_block(width), 128, 4)  # the setting until 2026-11-28
        rows.append((kernel, f"before: BLOCK_M={before[0]} BLOCK_N=128 warps=4", microseconds(lambda: launch(*before))))
        current = (sgmv_triton.merge_block_m(width), sgmv_triton.MERGE_BLOCK_N, sgmv_triton.MERGE_WARPS)
        others = [(m, n, w) for m, n, w in itertools.product((16, 32, 64, 128), (64, 128, 256), (2, 4, 8)) if width % m == 0]
        sweep(rows, kernel, [current, *others], launch, lambda m, n, w: f"BLOCK_M={m} BLOCK_N={n} warps={w}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--kernels", default="shrink,expand,gelu,layernorm,merge")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    kernels = set(args.kernels.split(","))
    torch.manual_seed(0)
    device, dtype, tokens, rank, slots = torch.device("cuda"), torch.bfloat16, args.tokens, args.rank, args.adapters + 1
    table, token_slots, _ = build_lora_batch_tables(segments_of(tokens, args.adapters), device, with_token_slots=True)
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
    a_narrow = torch.randn(slots, rank, HIDDEN, device=device, dtype=dtype) * 0.02
    for name, source, a in (("shrink qkv", x, a_qkv), ("shrink attention.output.dense", x, a_narrow),
                            ("shrink output.dense", wide, a_wide)):
        if "shrink" not in kernels:
            break
        rank_total = a.shape[1]
        out = torch.empty(tokens, rank_total, device=device)
        current_r = min(64, max(16, triton.next_power_of_2(rank_total)))
        # (BLOCK_R, BLOCK_K, warps, stages, programs per table block of BLOCK_T tokens)
        settings = [(current_r, sgmv_triton.SHRINK_BLOCK_K, 4, 3, 1)] + [
            (current_r, block_k, warps, stages, split)
            for block_k, warps, stages, split in itertools.product((128, 256), (4, 8), (3, 4, 6), (1, 2, 4))
        ]

        def shrink(block_r, block_k, warps, stages, split, source=source, a=a, out=out):
            sgmv_triton._sgmv_shrink_kernel[(blocks, triton.cdiv(a.shape[1], block_r), split)](
                source, a, out, table, source.shape[1], a.shape[1],
                source.stride(0), a.stride(0), a.stride(1), out.stride(0),
                BLOCK_T=BLOCK_T // split, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
            )
        rows.append((name, "one read of the input, no LoRA (bound)", microseconds(lambda source=source: source.sum(1))))
        sweep(rows, name, settings, shrink,
              lambda r, k, w, s, p: f"BLOCK_R={r} BLOCK_K={k} warps={w} stages={s} programs per block={p}")

    # Q/K/V expand into the fused projection's output (read-modify-write).
    def expand(block_n, warps, stages):
        sgmv_triton._sgmv_expand_kernel[(blocks, 3 * HIDDEN // block_n)](
            shrunk_qkv, b_qkv, qkv_out, table, 3 * HIDDEN, rank, HIDDEN,
            shrunk_qkv.stride(0), b_qkv.stride(0), b_qkv.stride(1), qkv_out.stride(0),
            BLOCK_T=BLOCK_T, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(rank)), num_warps=warps, num_stages=stages,
        )
    if "expand" in kernels:
        sweep(rows, "expand qkv", [(128, 4, 3), *itertools.product((64, 128, 256), (4, 8), (1, 2, 3))], expand,
              lambda n, w, s: f"BLOCK_N={n} warps={w} stages={s}")

    # GELU + LoRA over the intermediate output, in place as the layer runs it.
    launch = fused_ops.LORA_ACTIVATION_LAUNCH
    current_activation = (launch["BLOCK_T"], launch["BLOCK_N"], fused_ops.LORA_RANK_CHUNK, launch["num_warps"], launch["num_stages"])
    def gelu(block_t, block_n, block_r, warps, stages):
        fused_ops._add_lora_activation_kernel[(triton.cdiv(tokens, block_t), triton.cdiv(INTERMEDIATE, block_n))](
            wide, shrunk, b_wide, token_slots, wide, tokens, INTERMEDIATE, rank,
            wide.stride(0), shrunk.stride(0), b_wide.stride(0), b_wide.stride(1), wide.stride(0),
            ACTIVATION=1, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=warps, num_stages=stages,
        )
    if "gelu" in kernels:
        rows.append(("gelu + lora", "plain F.gelu, no LoRA (bound)", microseconds(lambda: torch.nn.functional.gelu(wide))))
        sweep(rows, "gelu + lora", [current_activation, *itertools.product((32, 64, 128), (64, 128, 256), (16,), (4, 8), (1, 2))],
              gelu, lambda t, n, r, w, s: f"BLOCK_T={t} BLOCK_N={n} warps={w} stages={s}")

    # Residual + LayerNorm + LoRA over a [T, 768] output.
    out = torch.empty_like(x)

    def layer_norm(rows_per, block_r, warps, stages):
        fused_ops._add_lora_layer_norm_kernel[(triton.cdiv(tokens, rows_per),)](
            x, residual, norm_weight, norm_bias, shrunk, b_narrow, token_slots, out,
            tokens, HIDDEN, rank, 1e-5, shrunk.stride(0), b_narrow.stride(0), b_narrow.stride(1),
            BLOCK=triton.next_power_of_2(HIDDEN), ROWS=rows_per, BLOCK_R=block_r, num_warps=warps, num_stages=stages,
        )
    if "layernorm" in kernels:
        rows.append(("layernorm + lora", "plain residual + LayerNorm kernel, no LoRA (bound)",
                     microseconds(lambda: fused_ops.add_layer_norm(x, residual, norm_weight, norm_bias, 1e-5))))
        current_norm = (fused_ops.ROWS_PER_LORA_NORM, fused_ops.LORA_RANK_CHUNK, *fused_ops.LORA_LAYER_NORM_LAUNCH.values())
        sweep(rows, "layernorm + lora", [current_norm, *itertools.product((16, 32, 64), (16,), (4, 8, 16), (1, 2))],
              layer_norm, lambda t, r, w, s: f"ROWS={t} warps={w} stages={s}")
    if "merge" in kernels:
        sweep_merge(rows, device, dtype, rank, slots)

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
        marked = ("current", "before", "bound", "reference")  # always shown; then the five fastest others
        shown = [row for row in measured if any(mark in row[1] for mark in marked)] + [
            row for row in measured if not any(mark in row[1] for mark in marked)][:5]
        for _, setting, time_us in sorted(shown, key=lambda row: row[2]):
            lines.append(f"| {kernel} | {setting} | {time_us:.1f} | {time_us / current[kernel]:.2f} |")
    write_table("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
