"""Linears on the cuBLASLt algorithm measured fastest for their shape (CUDA, 16-bit floats).

torch's `F.linear` and `torch._addmm_activation` run the first algorithm that cuBLASLt's heuristic
offers for a shape. For some of the encoder's linears another of its first eight candidates is
faster: on an H100, XLM-R large's Q/K/V takes 161 µs against 178 at 16,384 rows, and its
attention.output.dense 54 against 59 (benchmarks/cublaslt_algo_probe.py; NOTES item 53).

`tune_linears`, called once per engine at load, times those candidates for each linear shape of the
model at the engine's full batch, and keeps the fastest where it beats the first by at least
MIN_GAIN. `tuned_linear` then runs the kept algorithm for inputs of at least half those rows. It
returns None for every other input, and the caller runs torch's GEMM instead. Only candidates
without split-K are timed, and only those whose output equals torch's bit for bit at the tuned row
count are kept: each output element sums its products in the order torch's pick does there. At
other row counts torch may pick another kernel, so the two agree to rounding. The GPU tests check
both.

The library is the libcublasLt that torch has loaded, called through ctypes, with the same calls
torch makes. PyTorch's TunableOp does this search too, in versions after the one pinned here.
"""

from __future__ import annotations

import ctypes
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

# cublasLt.h
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
_PREF_MAX_WORKSPACE_BYTES = 1
_CONFIG_TILE_ID, _CONFIG_SPLITK_NUM = 1, 2
_COMPUTE_32F, _R_32F = 68, 0
_DATA_TYPES = {torch.bfloat16: 14, torch.float16: 2}
_OP_N, _OP_T = 0, 1
# The epilogue after x @ W.T: the bias, then the activation of `fused_ops.EPILOGUE_ACTIVATIONS`.
EPILOGUES = {None: 4, "gelu": 36, "relu": 6}  # BIAS, GELU_BIAS (tanh GELU), RELU_BIAS

CANDIDATES = 8  # the heuristic's first candidates timed per shape
MIN_GAIN = 0.02  # a candidate replaces torch's pick only if it is at least this much faster
WORKSPACE_BYTES = 4 << 20  # offered to the heuristic, as torch offers one, and passed to every matmul
TIMED_ROUNDS, CALLS_PER_ROUND = 3, 10


class _HeuristicResult(ctypes.Structure):  # cublasLtMatmulHeuristicResult_t
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


class CublasLtError(RuntimeError):
    """A cuBLASLt call failed (its status code is in the message)."""


def _check(status: int, call: str) -> None:
    if status != 0:
        raise CublasLtError(f"{call} returned cuBLAS status {status}")


@dataclass(frozen=True)
class TuningOutcome:
    """One linear shape's search: torch's pick (the heuristic's first) against the fastest candidate."""

    out_features: int
    in_features: int
    epilogue: str | None
    rows: int
    candidates: int  # timed (split-K ones are not)
    first_us: float
    best_us: float
    kept: bool  # the fastest replaces torch's pick for this shape
    timings: tuple[tuple[int, int, float], ...] = ()  # (heuristic rank, tile id, µs) of each timed candidate

    def describe(self) -> str:
        name = f"{self.out_features}x{self.in_features}{'+' + self.epilogue if self.epilogue else ''}"
        verdict = "kept" if self.kept else "torch's pick kept"
        return f"{name}: {self.first_us:.1f} -> {self.best_us:.1f} µs ({verdict})"


class _Library:
    """torch's libcublasLt with the signatures used here, and one handle and workspace per device."""

    def __init__(self, device: torch.device):
        x = torch.ones(16, 16, device=device, dtype=torch.bfloat16)
        F.linear(x, x, x[0])  # makes torch load libcublasLt
        torch.cuda.synchronize(device)
        path = next((line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                     if "libcublasLt.so" in line), None)
        if path is None:
            raise CublasLtError("torch has not loaded libcublasLt")
        lib = ctypes.CDLL(path)
        p = ctypes.c_void_p
        i, size = ctypes.c_int, ctypes.c_size_t  # every pointer as c_void_p: a bare int would pass as 32 bits
        for name, argtypes in {
            "cublasLtCreate": [p],
            "cublasLtMatmulDescCreate": [p, i, i],
            "cublasLtMatmulDescSetAttribute": [p, i, p, size],
            "cublasLtMatrixLayoutCreate": [p, i, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64],
            "cublasLtMatmulPreferenceCreate": [p],
            "cublasLtMatmulPreferenceSetAttribute": [p, i, p, size],
            "cublasLtMatmulPreferenceDestroy": [p],
            "cublasLtMatmulAlgoGetHeuristic": [p, p, p, p, p, p, p, i, p, p],
            "cublasLtMatmulAlgoConfigGetAttribute": [p, i, p, size, p],
            "cublasLtMatmulAlgoCheck": [p, p, p, p, p, p, p, p],
            "cublasLtMatmul": [p, p, p, p, p, p, p, p, p, p, p, p, p, p, size, p],
            "cublasLtMatrixLayoutDestroy": [p],
            "cublasLtMatmulDescDestroy": [p],
        }.items():
            getattr(lib, name).argtypes = argtypes
        self.lib = lib
        self.handles: dict[int, ctypes.c_void_p] = {}
        # One stream runs an engine's GEMMs, eager or replayed, one after the other: one workspace
        # serves them all (torch keeps one per stream for the same reason).
        self.workspaces: dict[int, torch.Tensor] = {}
        self.one, self.zero = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def handle(self, index: int) -> int:
        if index not in self.handles:
            handle = ctypes.c_void_p()
            with torch.cuda.device(index):
                _check(self.lib.cublasLtCreate(ctypes.byref(handle)), "cublasLtCreate")
            self.handles[index] = handle
            self.workspaces[index] = torch.empty(WORKSPACE_BYTES, device=torch.device("cuda", index), dtype=torch.uint8)
        return self.handles[index].value

    def layout(self, dtype: torch.dtype, rows: int, cols: int, leading: int) -> ctypes.c_void_p:
        """A column-major matrix layout (rows x cols, leading dimension `leading`)."""
        layout = ctypes.c_void_p()
        _check(self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), _DATA_TYPES[dtype], rows, cols, leading),
               "cublasLtMatrixLayoutCreate")
        return layout

    def matmul_desc(self, epilogue: str | None, bias: torch.Tensor) -> ctypes.c_void_p:
        """D = epilogue(op(A) @ B + bias) with A transposed: out^T[N, M] = W[N, K] @ x^T[K, M]."""
        desc = ctypes.c_void_p()
        _check(self.lib.cublasLtMatmulDescCreate(ctypes.byref(desc), _COMPUTE_32F, _R_32F), "cublasLtMatmulDescCreate")
        for attribute, value in ((_DESC_TRANSA, ctypes.c_int32(_OP_T)), (_DESC_TRANSB, ctypes.c_int32(_OP_N)),
                                 (_DESC_EPILOGUE, ctypes.c_uint32(EPILOGUES[epilogue])),
                                 (_DESC_BIAS_POINTER, ctypes.c_void_p(bias.data_ptr()))):
            _check(self.lib.cublasLtMatmulDescSetAttribute(desc, attribute, ctypes.byref(value), ctypes.sizeof(value)),
                   "cublasLtMatmulDescSetAttribute")
        return desc


_library: _Library | None = None


def _the_library(device: torch.device) -> _Library:
    global _library
    if _library is None:
        _library = _Library(device)
    return _library


@dataclass
class _TunedShape:
    """The algorithm kept for one (device, out, in, epilogue, dtype), and the descriptors it runs with."""

    algo: _HeuristicResult
    dtype: torch.dtype
    out_features: int
    in_features: int
    epilogue: str | None
    min_rows: int
    weight_layout: ctypes.c_void_p
    descs: dict[int, ctypes.c_void_p] = field(default_factory=dict)  # bias pointer -> matmul desc
    row_layouts: dict[int, tuple | None] = field(default_factory=dict)  # rows -> (x, out) layouts; None: unsupported

    def desc(self, library: _Library, bias: torch.Tensor) -> int:
        pointer = bias.data_ptr()
        desc = self.descs.get(pointer)
        if desc is None:
            desc = self.descs[pointer] = library.matmul_desc(self.epilogue, bias)
        return desc.value

    def layouts(self, library: _Library, handle: int, desc: int, rows: int) -> tuple | None:
        """The layouts of x and the output at this row count, if the kept algorithm supports it."""
        if rows not in self.row_layouts:
            if len(self.row_layouts) >= 256:  # eager batches: any row count; keep the cache bounded
                self.release_row_layouts(library)
            x_layout = library.layout(self.dtype, self.in_features, rows, self.in_features)
            out_layout = library.layout(self.dtype, self.out_features, rows, self.out_features)
            check = _HeuristicResult()
            status = library.lib.cublasLtMatmulAlgoCheck(
                handle, desc, self.weight_layout.value, x_layout.value, out_layout.value, out_layout.value,
                ctypes.addressof(self.algo.algo), ctypes.addressof(check))
            self.row_layouts[rows] = (x_layout.value, out_layout.value) if status == 0 else None
        return self.row_layouts[rows]

    def release_row_layouts(self, library: _Library) -> None:
        for layouts in self.row_layouts.values():
            for layout in layouts or ():
                library.lib.cublasLtMatrixLayoutDestroy(layout)
        self.row_layouts.clear()

    def release(self, library: _Library) -> None:
        """Destroy its descriptors (host objects only: graphs captured with them stay valid)."""
        self.release_row_layouts(library)
        for desc in self.descs.values():
            library.lib.cublasLtMatmulDescDestroy(desc)
        self.descs.clear()
        library.lib.cublasLtMatrixLayoutDestroy(self.weight_layout)


_tuned: dict[tuple, _TunedShape] = {}


def _device_index(device: torch.device) -> int:
    """The CUDA device's index ("cuda" alone names the current one)."""
    return torch.cuda.current_device() if device.index is None else device.index


def _key(index: int, out_features: int, in_features: int, epilogue: str | None, dtype: torch.dtype) -> tuple:
    return index, out_features, in_features, epilogue, dtype


def _aligned(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous() and tensor.data_ptr() % 16 == 0


def tuned_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, epilogue: str | None) -> torch.Tensor | None:
    """epilogue(x @ weight.T + bias) on the algorithm `tune_linears` kept for this shape, or None
    (no algorithm kept, fewer rows than it was kept for, or an input it does not take)."""
    if not _tuned or not x.is_cuda or bias is None or x.dim() != 2:
        return None
    index = x.device.index
    shape = _tuned.get(_key(index, weight.shape[0], weight.shape[1], epilogue, x.dtype))
    rows = x.shape[0]
    if (
        shape is None
        or rows < shape.min_rows
        or weight.dtype != x.dtype
        or bias.dtype != x.dtype
        or not (_aligned(x) and _aligned(weight) and _aligned(bias))
        or torch.cuda.current_device() != index
    ):
        return None
    library = _library
    handle = library.handle(index)
    desc = shape.desc(library, bias)
    layouts = shape.layouts(library, handle, desc, rows)
    if layouts is None:
        return None
    x_layout, out_layout = layouts
    out = torch.empty(rows, shape.out_features, device=x.device, dtype=x.dtype)
    try:
        _run(library, handle, desc, shape.weight_layout.value, x_layout, out_layout, ctypes.addressof(shape.algo.algo),
             weight, x, out)
    except CublasLtError:  # refused on the host before anything ran: torch's GEMM for this row count
        for layout in layouts:
            library.lib.cublasLtMatrixLayoutDestroy(layout)
        shape.row_layouts[rows] = None
        return None
    return out


def _run(library: _Library, handle: int, desc: int, weight_layout: int, x_layout: int, out_layout: int, algo: int,
         weight: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> None:
    """One cuBLASLt matmul on the current stream."""
    _check(library.lib.cublasLtMatmul(
        handle, desc, ctypes.addressof(library.one), weight.data_ptr(), weight_layout, x.data_ptr(), x_layout,
        ctypes.addressof(library.zero), out.data_ptr(), out_layout, out.data_ptr(), out_layout, algo,
        library.workspaces[x.device.index].data_ptr(), WORKSPACE_BYTES, torch.cuda.current_stream(x.device).cuda_stream),
        "cublasLtMatmul")


def _config(library: _Library, result: _HeuristicResult, attribute: int) -> int:
    value, written = ctypes.c_uint32(0), ctypes.c_size_t(0)
    _check(library.lib.cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(result.algo), attribute, ctypes.byref(value),
                                                            4, ctypes.byref(written)), "cublasLtMatmulAlgoConfigGetAttribute")
    return value.value


def _microseconds(function) -> float:
    """The median over TIMED_ROUNDS rounds of CALLS_PER_ROUND calls (CUDA events), after two calls."""
    function()
    function()
    rounds = []
    for _ in range(TIMED_ROUNDS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(CALLS_PER_ROUND):
            function()
        end.record()
        end.synchronize()
        rounds.append(start.elapsed_time(end) * 1000 / CALLS_PER_ROUND)
    return statistics.median(rounds)


def _torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, epilogue: str | None) -> torch.Tensor:
    if epilogue is None:
        return F.linear(x, weight, bias)
    return torch._addmm_activation(bias, x, weight.t(), use_gelu=epilogue == "gelu")


def tune_linear(
    out_features: int, in_features: int, epilogue: str | None, rows: int, device: torch.device, dtype: torch.dtype,
    candidates: int = CANDIDATES, min_gain: float = MIN_GAIN, other_than_first: bool = False,
) -> TuningOutcome:
    """Time the heuristic's first `candidates` algorithms for this shape at `rows` rows (random
    inputs) and keep the fastest for inputs of at least rows / 2, where it beats the first by
    `min_gain` and its output equals torch's. other_than_first: keep the fastest of the others,
    however fast (the tests: an algorithm that is not torch's)."""
    device = torch.device("cuda", _device_index(torch.device(device)))
    library = _the_library(device)
    handle = library.handle(device.index)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, in_features, device=device, dtype=dtype, generator=generator)
    weight = torch.randn(out_features, in_features, device=device, dtype=dtype, generator=generator) * in_features ** -0.5
    bias = torch.randn(out_features, device=device, dtype=dtype, generator=generator) * 0.1
    expected = _torch_linear(x, weight, bias, epilogue)
    out = torch.empty_like(expected)
    desc = library.matmul_desc(epilogue, bias)
    weight_layout = library.layout(dtype, in_features, out_features, in_features)
    x_layout = library.layout(dtype, in_features, rows, in_features)
    out_layout = library.layout(dtype, out_features, rows, out_features)
    preference = ctypes.c_void_p()
    _check(library.lib.cublasLtMatmulPreferenceCreate(ctypes.byref(preference)), "cublasLtMatmulPreferenceCreate")
    workspace = ctypes.c_uint64(WORKSPACE_BYTES)
    _check(library.lib.cublasLtMatmulPreferenceSetAttribute(preference, _PREF_MAX_WORKSPACE_BYTES,
                                                            ctypes.byref(workspace), 8), "cublasLtMatmulPreferenceSetAttribute")
    results = (_HeuristicResult * candidates)()
    returned = ctypes.c_int(0)
    _check(library.lib.cublasLtMatmulAlgoGetHeuristic(handle, desc, weight_layout, x_layout, out_layout, out_layout,
                                                      preference, candidates, results, ctypes.byref(returned)),
           "cublasLtMatmulAlgoGetHeuristic")
    library.lib.cublasLtMatmulPreferenceDestroy(preference)
    timed = []  # (µs, index)
    for index in range(returned.value):
        result = results[index]
        if result.state != 0 or result.workspace_size > WORKSPACE_BYTES or _config(library, result, _CONFIG_SPLITK_NUM) > 1:
            continue

        def call(result=result):
            _run(library, handle, desc.value, weight_layout.value, x_layout.value, out_layout.value,
                 ctypes.addressof(result.algo), weight, x, out)

        call()
        if not torch.equal(out, expected):  # another summation order: not the same answers as torch's
            continue
        timed.append((_microseconds(call), index))
    tiles = {index: _config(library, results[index], _CONFIG_TILE_ID) for _, index in timed}
    first_us = next((us for us, index in timed if index == 0), None)
    if first_us is None:  # the heuristic's first pick is torch's; without it there is nothing to compare
        first_us = _microseconds(lambda: _torch_linear(x, weight, bias, epilogue))
    others = [(us, index) for us, index in timed if index != 0 or not other_than_first]
    best_us, best_index = min(others) if others else (first_us, 0)
    kept = best_index != 0 and (other_than_first or best_us <= (1.0 - min_gain) * first_us)
    key = _key(device.index, out_features, in_features, epilogue, dtype)
    _forget(key)
    if kept:
        algo = _HeuristicResult.from_buffer_copy(results[best_index])
        _tuned[key] = _TunedShape(algo, dtype, out_features, in_features, epilogue, max(1, rows // 2), weight_layout)
    else:
        library.lib.cublasLtMatrixLayoutDestroy(weight_layout)
    for layout in (x_layout, out_layout):
        library.lib.cublasLtMatrixLayoutDestroy(layout)
    library.lib.cublasLtMatmulDescDestroy(desc)
    return TuningOutcome(out_features, in_features, epilogue, rows, len(timed), first_us, best_us, kept,
                         tuple((index, tiles[index], us) for us, index in sorted(timed)))


def tune_linears(
    shapes: Iterable[tuple[int, int, str | None]], rows: int, device: torch.device | str, dtype: torch.dtype
) -> list[TuningOutcome]:
    """`tune_linear` for each distinct (out features, in features, epilogue) in `shapes`."""
    return [tune_linear(out_features, in_features, epilogue, rows, torch.device(device), dtype)
            for out_features, in_features, epilogue in dict.fromkeys(shapes)]


def _forget(key: tuple) -> None:
    shape = _tuned.pop(key, None)
    if shape is not None:
        shape.release(_library)


def forget_tuning() -> None:
    """Drop every kept algorithm (torch's GEMMs run again everywhere)."""
    for key in list(_tuned):
        _forget(key)


def tuning_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in _DATA_TYPES and Path("/proc/self/maps").exists()
