"""The fused LoRA GEMM of `lora_gemm_triton` as a warp-specialized, persistent Hopper kernel (Gluon).

    out[t] = activation(x[t] @ W.T + bias + shrunk[t] @ B[slot].T),  slot = token_slots[t]

Same arguments, tile table and result as `lora_gemm_triton.lora_gemm`, which picks this kernel on
sm_90 when `gluon_lora_gemm_supported` says it applies. Why another kernel: the Triton one runs one
program per output tile, so a tile's LoRA expand (global loads of the shrunk rows and of B, then a
small dot per adapter of the tile) stalls the tensor cores, and its GEMM alone reached 94-97% of
cuBLAS at the XLM-R base shapes. Here (benchmarks/NOTES.md items 35-37 and 39):

- programs = SMs, each walking output tiles in groups of GROUP_M tile rows (L2 reuse of W);
- one loader warp only issues TMA loads: each tile's x and W blocks into a ring of STAGES buffers,
  then the B block [BLOCK_N, RANK] of each adapter of the tile into a ring of two (one where a
  second would cost an x/W stage), so B is in shared memory before the tile's MMAs end;
- the default partition (8 warps: two warpgroups on the 128-row tile) loads the tile's shrunk rows
  and row slots into registers before its K loop (their latency hides behind the MMAs), issues
  the wgmma chain, then one more wgmma per adapter of the tile, one at a time (A: that slot's
  shrunk rows, others zero, from registers; B from the ring), then bias, activation and a TMA
  store that overlaps the next tile's MMAs.

On the H200, with BLOCK_N 256 and 3 stages, this GEMM without LoRA ran at 0.98-1.01x cuBLAS. With
the expand of 64 rank-16 adapters it took 25 µs per XLM-R base layer more than cuBLAS without LoRA;
the Triton kernel took 49 µs more (results/gluon-gemm-2026-11-28-h200.md). The shrunk values are
rounded to the weights' dtype before their MMA, as in the Triton kernel. Rank capacities other than 16 and 32 take the Triton kernel
(larger ones: the shrunk rows held across the K loop would cost too many registers).
"""

from __future__ import annotations

import functools

import torch

from ..fused_ops import ACTIVATION_CODES

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # CPU machines, or a Triton without Gluon: the Triton kernel or the reference
    gluon = None

BLOCK_M, BLOCK_K, NUM_WARPS, GROUP_M = 128, 64, 8, 8
# Registers per thread at launch: the loader warp and the 8 MMA warps share the SM's 64k registers;
# the loader keeps 24 (`warp_specialize` below) and gives the rest back.
MAX_REGISTERS = 168
# BLOCK_N: STAGES. 256 columns with 3 stages fit the 227 KB of shared memory with the output tile
# and a rank-16 B ring; 128-column tiles (slices of 384) take 4. Fewer where they do not fit.
LAUNCHES = {256: 3, 128: 4}
SHARED_MEMORY = 232448  # bytes per block on sm_90
SCRATCH = 2048  # barriers and the epilogue's layout conversion, with room to spare


def stages_that_fit(block_n: int, rank: int, wanted: int, b_stages: int = 2) -> int:
    """The most ring stages, up to `wanted`, whose buffers fit in shared memory (bf16) beside the
    output tile and a B ring of `b_stages`."""
    fixed = 2 * (BLOCK_M * block_n + b_stages * block_n * rank) + SCRATCH
    per_stage = 2 * (BLOCK_M + block_n) * BLOCK_K
    return max(1, min(wanted, (SHARED_MEMORY - fixed) // per_stage))


@functools.lru_cache(maxsize=None)
def ring_sizes(block_n: int, rank: int, wanted: int) -> tuple[int, int]:
    """(x/W ring stages, B ring buffers): a B ring of two, unless the second buffer would cost an
    x/W stage (rank 32 at BLOCK_N 256); then one. Cached: it runs at every launch."""
    b_stages = 2 if stages_that_fit(block_n, rank, wanted) == wanted else 1
    return stages_that_fit(block_n, rank, wanted, b_stages), b_stages


def gluon_lora_gemm_supported(capability: tuple[int, int], x: torch.Tensor, out_features: int, slice_width: int,
                              rank: int) -> bool:
    """Where the Gluon kernel applies, given that `lora_gemm_triton.lora_gemm_supported` holds:
    Hopper (wgmma: sm_90 exactly), bf16, output tiles of 256 or 128 columns, and no LoRA or a rank
    capacity of 16 or 32 (B's TMA box is exactly RANK columns wide)."""
    from .lora_gemm_triton import block_n_for

    return (
        gluon is not None
        and capability == (9, 0)
        and x.dtype == torch.bfloat16
        and rank in (0, 16, 32)
        and block_n_for(out_features, slice_width or out_features) in LAUNCHES
    )


if gluon is not None:
    @gluon.jit
    def _tile_coordinates(tile, tiles_m, tiles_n, GROUP: gl.constexpr):
        """Output tile `tile` in groups of GROUP tile rows, column by column inside a group."""
        group_width = GROUP * tiles_n
        first_m = (tile // group_width) * GROUP
        group_rows = gl.minimum(tiles_m - first_m, GROUP)
        return first_m + (tile % group_width) % group_rows, (tile % group_width) // group_rows

    @gluon.jit
    def _loader(x_desc, w_desc, b_desc, x_ring, w_ring, b_ring, ready, empty, b_ready, b_empty,
                tile_slots_ptr, stride_tile, M, N, K, HAS_LORA: gl.constexpr,
                BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, B_STAGES: gl.constexpr,
                GROUP: gl.constexpr):
        """One warp: TMA loads of each tile's x and W blocks into the ring, then the B block of each
        adapter of the tile into the B ring, as far ahead of the MMAs as the rings allow."""
        tiles_m, tiles_n = gl.cdiv(M, BM), gl.cdiv(N, BN)
        issued = 0
        b_issued = 0
        for tile in range(gl.program_id(0), tiles_m * tiles_n, gl.num_programs(0)):
            tile_m, tile_n = _tile_coordinates(tile, tiles_m, tiles_n, GROUP)
            for k in range(0, K, BK):
                stage = issued % STAGES
                # Free once the MMA that read it is done (the first pass finds every stage free).
                mbarrier.wait(empty.index(stage), ((issued // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(stage), x_desc.block_type.nbytes + w_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(x_desc, [tile_m * BM, k], ready.index(stage), x_ring.index(stage))
                tma.async_copy_global_to_shared(w_desc, [tile_n * BN, k], ready.index(stage), w_ring.index(stage))
                issued += 1
            if HAS_LORA:
                tile_entry = tile_slots_ptr + tile_m * stride_tile  # the table's tiles are BM rows
                for run in range(gl.load(tile_entry)):
                    slot = gl.load(tile_entry + 1 + run)
                    stage = b_issued % B_STAGES
                    mbarrier.wait(b_empty.index(stage), ((b_issued // B_STAGES) & 1) ^ 1)
                    mbarrier.expect(b_ready.index(stage), b_desc.block_type.nbytes)
                    # B viewed as [slots * N, R]: this slot's rows of the tile's columns
                    tma.async_copy_global_to_shared(b_desc, [slot * N + tile_n * BN, 0], b_ready.index(stage),
                                                    b_ring.index(stage))
                    b_issued += 1

    @gluon.jit
    def _mma_epilogue(out_desc, bias_ptr, x_ring, w_ring, b_ring, ready, empty, b_ready, b_empty, out_smem,
                      token_slots_ptr, tile_slots_ptr, shrunk_ptr, slice_width, rank_capacity, stride_shrunk,
                      stride_tile, M, N, K, HAS_BIAS: gl.constexpr, HAS_LORA: gl.constexpr,
                      ACTIVATION: gl.constexpr, RANK: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                      BK: gl.constexpr, STAGES: gl.constexpr, B_STAGES: gl.constexpr, GROUP: gl.constexpr,
                      num_warps: gl.constexpr):
        """The default partition: wgmma over the ring (one MMA in flight while the next waits for
        its data), one wgmma per adapter of the tile, then bias, activation, and a TMA store that
        runs while the next tile's MMAs start."""
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN, 16]
        )
        # The shrunk rows are loaded straight into the layout of wgmma's register A operand.
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        tiles_m, tiles_n = gl.cdiv(M, BM), gl.cdiv(N, BN)
        consumed = 0
        b_consumed = 0
        for tile in range(gl.program_id(0), tiles_m * tiles_n, gl.num_programs(0)):
            tile_m, tile_n = _tile_coordinates(tile, tiles_m, tiles_n, GROUP)
            if HAS_LORA:
                # Loaded now, used after the K loop: the loads' latency hides behind the MMAs.
                rows = tile_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, a_layout))
                ranks = gl.arange(0, RANK, layout=gl.SliceLayout(0, a_layout))
                row_slots = gl.load(token_slots_ptr + rows, mask=rows < M, other=0)
                # This slice's shrunk columns: slice i's rank r is column i * rank_capacity + r.
                shrunk_columns = ((tile_n * BN) // slice_width) * rank_capacity + ranks
                shrunk = gl.load(shrunk_ptr + rows.to(gl.int64)[:, None] * stride_shrunk + shrunk_columns[None, :],
                                 mask=((rows < M) & (row_slots > 0))[:, None] & (ranks < rank_capacity)[None, :],
                                 other=0.0)
            acc = gl.zeros((BM, BN), dtype=gl.float32, layout=acc_layout)
            for k in range(0, K, BK):
                stage = consumed % STAGES
                mbarrier.wait(ready.index(stage), (consumed // STAGES) & 1)
                acc = warpgroup_mma(x_ring.index(stage), w_ring.index(stage).permute((1, 0)), acc, is_async=True)
                # At most this MMA in flight: the previous one is done, so its stage goes back to the loader.
                acc, _, _ = warpgroup_mma_wait(1, deps=(acc, x_ring.index(stage), w_ring.index(stage)))
                mbarrier.arrive(empty.index((consumed + STAGES - 1) % STAGES), pred=k > 0)
                consumed += 1
            if HAS_LORA:
                # One more MMA per adapter of the tile, queued behind the K loop's last one: that
                # slot's shrunk rows (others zero) times its B block.
                tile_entry = tile_slots_ptr + tile_m * stride_tile
                runs = gl.load(tile_entry)
                for run in range(runs):
                    slot = gl.load(tile_entry + 1 + run)
                    stage = (b_consumed + run) % B_STAGES
                    rows_of_slot = gl.where((row_slots == slot)[:, None], shrunk, 0.0).to(gl.bfloat16)
                    mbarrier.wait(b_ready.index(stage), ((b_consumed + run) // B_STAGES) & 1)
                    acc = warpgroup_mma(rows_of_slot, b_ring.index(stage).permute((1, 0)), acc, is_async=True)
                    # One run's MMA at a time, its B block back to the loader as soon as it is done.
                    # Building the next run's A operand while this MMA ran (wait(1)) gave wrong sums
                    # at rank 32 on an H200, even with this operand kept alive in the wait's deps;
                    # waiting costs nothing measurable at rank 16 (NOTES item 39).
                    acc, _, _ = warpgroup_mma_wait(0, deps=(acc, rows_of_slot, b_ring.index(stage)))
                    mbarrier.arrive(b_empty.index(stage))
                b_consumed += runs
            acc = warpgroup_mma_wait(0, deps=(acc,))  # the K loop's last MMA, where no run waited for it
            mbarrier.arrive(empty.index((consumed + STAGES - 1) % STAGES))
            columns = tile_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, acc_layout))
            if HAS_BIAS:
                acc = acc + gl.load(bias_ptr + columns).to(gl.float32)[None, :]
            if ACTIVATION == 1:  # exact GELU
                acc = 0.5 * acc * (1.0 + gl.erf(acc * 0.7071067811865476))
            elif ACTIVATION == 2:  # tanh GELU: 0.5 (1 + tanh(u)) = sigmoid(2u)
                inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
                acc = acc / (1.0 + gl.exp(-2.0 * inner))
            elif ACTIVATION == 3:
                acc = gl.maximum(acc, 0.0)
            tma.store_wait(0)  # the previous tile's store has read out_smem
            out_smem.store(acc.to(out_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(out_desc, [tile_m * BM, tile_n * BN], out_smem)  # clipped at M
        tma.store_wait(0)

    @gluon.jit
    def _gluon_lora_gemm_kernel(x_desc, w_desc, out_desc, b_desc, bias_ptr, token_slots_ptr, tile_slots_ptr,
                                shrunk_ptr, M, N, K, slice_width, rank_capacity, stride_shrunk, stride_tile,
                                HAS_BIAS: gl.constexpr, HAS_LORA: gl.constexpr, ACTIVATION: gl.constexpr,
                                RANK: gl.constexpr, STAGES: gl.constexpr, B_STAGES: gl.constexpr,
                                GROUP: gl.constexpr, num_warps: gl.constexpr):
        BM: gl.constexpr = out_desc.block_type.shape[0]
        BN: gl.constexpr = out_desc.block_type.shape[1]
        BK: gl.constexpr = x_desc.block_type.shape[1]
        x_ring = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
        w_ring = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        b_ring = gl.allocate_shared_memory(b_desc.dtype, [B_STAGES] + b_desc.block_type.shape, b_desc.layout)
        out_smem = gl.allocate_shared_memory(out_desc.dtype, out_desc.block_type.shape, out_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        b_ready = gl.allocate_shared_memory(gl.int64, [B_STAGES, 1], mbarrier.MBarrierLayout())
        b_empty = gl.allocate_shared_memory(gl.int64, [B_STAGES, 1], mbarrier.MBarrierLayout())
        for stage in gl.static_range(STAGES):
            mbarrier.init(ready.index(stage), count=1)
            mbarrier.init(empty.index(stage), count=1)
        for stage in gl.static_range(B_STAGES):
            mbarrier.init(b_ready.index(stage), count=1)
            mbarrier.init(b_empty.index(stage), count=1)
        gl.warp_specialize(
            [
                (_mma_epilogue, (out_desc, bias_ptr, x_ring, w_ring, b_ring, ready, empty, b_ready, b_empty, out_smem,
                                 token_slots_ptr, tile_slots_ptr, shrunk_ptr, slice_width, rank_capacity,
                                 stride_shrunk, stride_tile, M, N, K, HAS_BIAS, HAS_LORA, ACTIVATION, RANK,
                                 BM, BN, BK, STAGES, B_STAGES, GROUP, num_warps)),
                (_loader, (x_desc, w_desc, b_desc, x_ring, w_ring, b_ring, ready, empty, b_ready, b_empty,
                           tile_slots_ptr, stride_tile, M, N, K, HAS_LORA, BM, BN, BK, STAGES, B_STAGES, GROUP)),
            ],
            [1],  # the loader's warps
            [24],  # its registers per thread (the rest go to the MMA warps)
        )


@functools.lru_cache(maxsize=None)
def shared_layouts(block_n: int, rank: int):
    """The NVMMA shared layouts of the x, W, output and LoRA B blocks (bf16)."""
    return (
        gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.bfloat16),
        gl.NVMMASharedLayout.get_default_for([block_n, BLOCK_K], gl.bfloat16),
        gl.NVMMASharedLayout.get_default_for([BLOCK_M, block_n], gl.bfloat16),
        gl.NVMMASharedLayout.get_default_for([block_n, rank], gl.bfloat16),
    )


_SMS: dict[int, int] = {}


def multiprocessor_count(device: torch.device) -> int:
    """The SMs of a CUDA device (cached: the launch paths ask at every call)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


# A 128-column tile's time against half a 256-column one's (H200, NOTES item 44).
NARROW_TILE_COST = 1.2


def narrow_tiles_pay(rows: int, out_features: int, programs: int) -> bool:
    """Whether 128-column output tiles beat 256-column ones: the programs walk ceil(tiles / programs)
    tiles each, so a last partial round of wide tiles costs a whole one (at 8,192 tokens, 192 tiles of
    256 columns on 132 SMs take two rounds, 384 of 128 take three of half the length)."""
    row_tiles = -(-rows // BLOCK_M)
    wide_rounds = -(-row_tiles * (out_features // 256) // programs)
    narrow_rounds = -(-row_tiles * (out_features // 128) // programs)
    return narrow_rounds * NARROW_TILE_COST / 2 < wide_rounds


# Descriptors of the weights and B buffers, which live as long as the model or until the buffers grow
# (`forget_static_descriptors`): building one costs the host ~10 µs of Python, and the host's launch
# work bounds eager mixed-adapter batches (NOTES item 36). A descriptor is its values (address,
# shape, strides, block, layout), so a key of them is exact.
_STATIC_DESCRIPTORS: dict[tuple, "TensorDescriptor"] = {}
_STATIC_DESCRIPTORS_MAX = 512


def forget_static_descriptors() -> None:
    """Drop the cached descriptors, when LoRA buffers are reallocated: a descriptor holds its tensor,
    so a cached one kept the replaced buffer allocated. Captured graphs keep the descriptors they
    were captured with (kernel arguments are copied into the graph)."""
    _STATIC_DESCRIPTORS.clear()


def _static_descriptor(tensor: torch.Tensor, block: list[int], layout) -> "TensorDescriptor":
    key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype, tuple(block))
    descriptor = _STATIC_DESCRIPTORS.get(key)
    if descriptor is None:
        if len(_STATIC_DESCRIPTORS) >= _STATIC_DESCRIPTORS_MAX:  # e.g. the weights of many engines in one process
            _STATIC_DESCRIPTORS.clear()
        descriptor = _STATIC_DESCRIPTORS[key] = TensorDescriptor.from_tensor(tensor, block, layout)
    return descriptor


def gluon_lora_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str = "identity",
    lora_b_cat: torch.Tensor | None = None,
    slice_width: int = 0,
    token_slots: torch.Tensor | None = None,
    tile_slots: torch.Tensor | None = None,
    shrunk: torch.Tensor | None = None,
    launch: tuple | None = None,
) -> torch.Tensor:
    """`lora_gemm_triton.lora_gemm`'s result from the Gluon kernel; needs `lora_gemm_supported` and
    `gluon_lora_gemm_supported`. launch: (BLOCK_N cap, STAGES), for benchmarks."""
    from .lora_gemm_triton import block_n_for

    total, in_features = x.shape
    out_features = weight.shape[0]
    out = torch.empty(total, out_features, device=x.device, dtype=x.dtype)
    if total == 0:
        return out
    slice_width = slice_width or out_features
    programs = multiprocessor_count(x.device)
    block_n = block_n_for(out_features, slice_width, launch[0] if launch else 256)
    if launch is None and block_n == 256 and narrow_tiles_pay(total, out_features, programs):
        block_n = 128
    has_lora = shrunk is not None
    rank_capacity = lora_b_cat.shape[2] if has_lora else 0
    rank = rank_capacity if has_lora else 16
    stages, b_stages = ring_sizes(block_n, rank, launch[1] if launch else LAUNCHES[block_n])
    x_layout, w_layout, out_layout, b_layout = shared_layouts(block_n, rank)
    tiles = triton.cdiv(total, BLOCK_M) * (out_features // block_n)
    # B viewed as [slots * out, R], R = RANK
    b_view = lora_b_cat.view(-1, rank_capacity) if has_lora else weight[:, :16]
    placeholder = weight  # pointers the kernel does not read
    _gluon_lora_gemm_kernel[(min(tiles, programs),)](
        TensorDescriptor.from_tensor(x, [BLOCK_M, BLOCK_K], x_layout),
        _static_descriptor(weight, [block_n, BLOCK_K], w_layout),
        TensorDescriptor.from_tensor(out, [BLOCK_M, block_n], out_layout),
        _static_descriptor(b_view, [block_n, rank], b_layout),
        bias if bias is not None else placeholder,
        *((token_slots, tile_slots, shrunk) if has_lora else (placeholder,) * 3),
        total, out_features, in_features, slice_width, rank_capacity,
        shrunk.stride(0) if has_lora else 0, tile_slots.stride(0) if has_lora else 0,
        HAS_BIAS=bias is not None, HAS_LORA=has_lora, ACTIVATION=ACTIVATION_CODES[activation], RANK=rank,
        STAGES=stages, B_STAGES=b_stages, GROUP=GROUP_M, num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS,
    )
    return out
