"""CUDA tensor cores (sm_80 and later): the convolution as an implicit GEMM on `mma.sync`, accumulating in
float32, for float16 layers and for float32 layers with `tf32=True` (products of inputs cut to TF32's
10-bit mantissa).

TF32 inputs are rounded to nearest when they are loaded into registers, as cuDNN and cuBLAS do.

The GEMM: M = output pixels (batch, rows, columns), N = filters, K = the window's taps x input channels.
The "conv" block is reindexed into that form (`reindex`, `transform_layout`, `transform_block_layout`),
padded to whole tiles (`pad_einsum`: M to a multiple of 64, N to 16, K to a fragment's depth), and
tiled: a thread block computes a (warps_m x frags_m x 16) x (warps_n x frags_n x 16) tile, each warp
frags_m x frags_n fragments of 16 x 16 held in registers. Per reduction step (k_chunks fragments deep)
the block stages the step's im2col tile of the input (its padding read through bounds checks) and of
the weights in shared memory; each warp loads its fragments from there (ldmatrix for float16, lane by
lane for TF32) and multiplies them on the tensor cores. The accumulators go to shared memory, where
the epilogue (bias, activation, cast, data format) reads them in the same kernel.

The intrinsics are tvm.s_tir.TensorIntrin registrations of TVM's PTX builtins (ldmatrix, mma.sync and
its fill and store helpers) with the fragment layouts of PTX's mma.m16n8k16 and m16n8k8 (the float16
ones as in tvm.s_tir.tensor_intrin.cuda, which has no TF32 ones). They are registered here, on first
use, rather than by importing tvm.s_tir.tensor_intrin.cuda: that module parses ~500 TVMScript
functions, 24-90 s in every process that schedules a kernel, and TVM has no TF32 intrinsics.
"""
import dataclasses
import functools

from tvm import s_tir
from tvm.runtime import convert
from tvm.script import tirx as T
from tvm.tirx import IndexMap

from tvmconv.compute import ConvWorkload

WARP = 32
M_PADDING = 64  # M is padded to this (the output pixels of a batch-1 7x7 layer, 49, to 64)
# The alignment the intrinsics' tiles claim: their element's. Where the GEMM needs no padding (M and K whole
# tiles: most 1x1 layers at batch 8), A's stage is the reindex of x itself and inherits x's declaration,
# element-aligned so that CPU kernels read the caller's arrays in place (compute.read_unaligned). What the
# instructions need (ldmatrix's 16-byte rows) comes from the shared allocation and the rows' padding
# (storage_align), not from this claim.
_ALIGN = {"float16": 2, "float32": 4}


@dataclasses.dataclass(frozen=True)
class Knobs:
    """The tensor-core template's tiles, in 16 x 16 fragments (all may be sampled decisions)."""
    warps_m: int = 2   # warps along output pixels per block
    warps_n: int = 2   # warps along filters per block
    frags_m: int = 2   # fragments along pixels per warp
    frags_n: int = 2   # fragments along filters per warp
    k_chunks: int = 2  # fragments along the reduction per shared-memory stage

    weight_block = 0  # Keras's weight layout (compute.pack_weights)
    flat_tile = 0  # the conv stage over (batch, rows, columns) (compute.conv2d_forward)
    layout = (0, 0, 0)  # Keras's weights, rows and columns, the direct sum: prim_func(*layout)


def applies(wl: ConvWorkload, target) -> bool:
    """Whether the template computes `wl` on `target`: float16 or TF32 on sm_80 and later, one group."""
    arch = str(target.attrs.get("arch", ""))
    new_enough = arch.startswith("sm_") and arch[3:].isdigit() and int(arch[3:]) >= 80
    return new_enough and wl.groups == 1 and (wl.dtype == "float16" or wl.tf32)


def _depth(wl: ConvWorkload) -> int:
    """A fragment's depth along K: 16 for float16 (m16n8k16), 8 for TF32 (m16n8k8)."""
    return 16 if wl.dtype == "float16" else 8


def _extents(wl: ConvWorkload) -> tuple[int, int, int]:
    """The padded GEMM's M, N and K in fragments."""
    m = wl.batch * wl.out_height * wl.out_width
    k = wl.kernel_size[0] * wl.kernel_size[1] * wl.group_in_channels
    return -(-m // M_PADDING) * M_PADDING // 16, -(-wl.filters // 16), -(-k // _depth(wl))


def _divisors(extent: int, values=(1, 2, 4)) -> list[int]:
    return [v for v in values if extent % v == 0]


def default_knobs(wl: ConvWorkload) -> Knobs:
    """64 x 64 blocks of 4 warps, 2 x 2 fragments each, 2 fragments deep per stage, made smaller where the
    GEMM is: every tile divides its padded extent. (Not yet measured on a GPU.)"""
    m, n, k = _extents(wl)

    def fit(extent, wanted):
        return max(d for d in _divisors(extent) if d <= wanted)
    warps_m = fit(m, 2)
    warps_n = fit(n, 2)
    return Knobs(warps_m, warps_n, fit(m // warps_m, 2), fit(n // warps_n, 2), fit(k, 2))


def sample_tiles(sch: s_tir.Schedule, wl: ConvWorkload, knobs: Knobs) -> Knobs:
    """`knobs` with each tile a decision sampled among 1, 2 and 4 where it divides the padded extent
    (samples whose tiles together do not divide it fail to tensorize and are rejected)."""
    m, n, k = _extents(wl)

    def sample(extent):
        candidates = _divisors(extent)
        return sch.sample_categorical(candidates, [1 / len(candidates)] * len(candidates))
    return Knobs(sample(m), sample(n), sample(m), sample(n), sample(k))


# ---------------------------------------------------------------- the intrinsics


def _accumulator_layout(i, j):
    """A 16 x 16 float32 accumulator (two m16n8 halves) as (lane, register): PTX's mma C fragment."""
    return 4 * (i % 8) + (j % 8) // 2, 4 * (j // 8) + 2 * (i // 8) + j % 2


def _tf32_a_layout(i, k):
    """A 16 x 8 TF32 tile as (lane, register): PTX's m16n8k8 A fragment (a0..a3)."""
    return 4 * (i % 8) + k % 4, i // 8 + 2 * (k // 4)


def _tf32_b_layout(k, j):
    """An 8 x 16 TF32 tile (two n8 halves) as (lane, register): PTX's m16n8k8 B fragment (b0, b1)."""
    return 4 * (j % 8) + k % 4, 2 * (j // 8) + k // 4


@dataclasses.dataclass(frozen=True)
class Intrinsics:
    """The names of one precision's registered intrinsics, and its fragment layouts."""
    load_a: str
    load_b: str
    mma: str
    fill: str
    store: str
    a_layout: object  # (row, col) of a 16 x depth tile -> (lane, register)
    b_layout: object  # (row, col) of a depth x 16 tile -> (lane, register)


def _copy_desc(rows: int, cols: int, registers: int, dtype: str, layout, source_scope: str, offset_factor: int):
    """A tile copied from shared memory into a warp's registers laid out by `layout`."""
    @T.prim_func(s_tir=True)
    def desc(warp_handle: T.handle, shared_handle: T.handle) -> None:
        shared = T.match_buffer(shared_handle, (rows, cols), dtype, align=_ALIGN[dtype], offset_factor=offset_factor,
                                scope=source_scope)
        warp = T.match_buffer(warp_handle, (WARP, registers), dtype, align=_ALIGN[dtype], offset_factor=offset_factor,
                              scope="warp")
        with T.sblock("root"):
            T.reads(shared[0:rows, 0:cols])
            T.writes(warp[0:WARP, 0:registers])
            for ax0, ax1 in T.grid(rows, cols):
                with T.sblock("shared_warp"):
                    v0, v1 = T.axis.remap("SS", [ax0, ax1])
                    lane, register = T.meta_var(layout(v0, v1))
                    T.reads(shared[v0, v1])
                    T.writes(warp[lane, register])
                    warp[lane, register] = shared[v0, v1]
    return desc


def _ldmatrix_impl(registers: int, transposed: bool, offset):
    """float16: the 16 x 16 tile by one ldmatrix.x4 (transposed for B, stored K-major)."""
    @T.prim_func(s_tir=True)
    def impl(warp_handle: T.handle, shared_handle: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        shared = T.match_buffer(shared_handle, (16, 16), "float16", align=_ALIGN["float16"], offset_factor=16,
                                scope="shared", strides=[s0, s1])
        warp = T.match_buffer(warp_handle, (WARP, registers), "float16", align=_ALIGN["float16"], offset_factor=16,
                              scope="warp")
        with T.sblock("root"):
            T.reads(shared[0:16, 0:16])
            T.writes(warp[0:WARP, 0:registers])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                T.evaluate(T.ptx_legacy.ldmatrix(transposed, 4, ".b16", warp.data, warp.elem_offset + registers * tx,
                                                 shared.access_ptr("r"), offset(tx, s0), dtype="float16"))
    return impl


def _lanewise_impl(rows: int, cols: int, registers: int, position):
    """TF32: each lane reads its registers' elements of the tile (ldmatrix moves 16-bit elements only),
    rounded to TF32's 10-bit mantissa (to nearest, ties away from zero, as cvt.rna.tf32.f32: the tensor
    cores would drop the 13 low bits)."""
    @T.prim_func(s_tir=True)
    def impl(warp_handle: T.handle, shared_handle: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        shared = T.match_buffer(shared_handle, (rows, cols), "float32", align=_ALIGN["float32"], offset_factor=cols,
                                scope="shared", strides=[s0, s1])
        warp = T.match_buffer(warp_handle, (WARP, registers), "float32", align=_ALIGN["float32"], offset_factor=cols,
                              scope="warp")
        with T.sblock("root"):
            T.reads(shared[0:rows, 0:cols])
            T.writes(warp[0:WARP, 0:registers])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                for register in T.serial(registers):
                    row, col = T.meta_var(position(tx, register))
                    warp[tx, register] = T.reinterpret("float32", (T.reinterpret("uint32", shared[row, col])
                                                                   + T.uint32(0x1000)) & T.uint32(0xFFFFE000))
    return impl


def _mma(depth: int, dtype: str, abbreviation: str):
    """C (16 x 16, float32) += A (16 x depth) . B (depth x 16): two mma.sync of m16n8, one per half of N."""
    a_registers, b_registers = 16 * depth // WARP, 16 * depth // WARP
    a_layout, b_layout = (_ldmatrix_a_layout, _ldmatrix_b_layout) if depth == 16 else (_tf32_a_layout, _tf32_b_layout)

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WARP, a_registers), dtype, align=_ALIGN[dtype], offset_factor=depth, scope="warp")
        B = T.match_buffer(b, (WARP, b_registers), dtype, align=_ALIGN[dtype], offset_factor=16, scope="warp")
        C = T.match_buffer(c, (WARP, 8), "float32", align=_ALIGN["float32"], offset_factor=16, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:8], A[0:WARP, 0:a_registers], B[0:WARP, 0:b_registers])
            T.writes(C[0:WARP, 0:8])
            for i, j, k in T.grid(16, 16, depth):
                with T.sblock("C"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    c_lane, c_register = T.meta_var(_accumulator_layout(vi, vj))
                    a_lane, a_register = T.meta_var(a_layout(vi, vk))
                    b_lane, b_register = T.meta_var(b_layout(vk, vj))
                    T.reads(C[c_lane, c_register], A[a_lane, a_register], B[b_lane, b_register])
                    T.writes(C[c_lane, c_register])
                    C[c_lane, c_register] += T.Cast("float32", A[a_lane, a_register]) * T.Cast(
                        "float32", B[b_lane, b_register])

    shape = f"m16n8k{depth}"

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WARP, a_registers), dtype, align=_ALIGN[dtype], offset_factor=depth, scope="warp")
        B = T.match_buffer(b, (WARP, b_registers), dtype, align=_ALIGN[dtype], offset_factor=16, scope="warp")
        C = T.match_buffer(c, (WARP, 8), "float32", align=_ALIGN["float32"], offset_factor=16, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:8], A[0:WARP, 0:a_registers], B[0:WARP, 0:b_registers])
            T.writes(C[0:WARP, 0:8])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                for half in T.unroll(2):
                    T.evaluate(T.ptx_legacy.mma(
                        shape, "row", "col", abbreviation, abbreviation, "fp32",
                        A.data, A.elem_offset + tx * a_registers,
                        B.data, B.elem_offset + tx * b_registers + half * (b_registers // 2),
                        C.data, C.elem_offset + tx * 8 + half * 4, False, dtype="float32"))
    return desc, impl


def _ldmatrix_a_layout(i, k):
    """A 16 x 16 float16 tile as (lane, register): PTX's m16n8k16 A fragment, as ldmatrix.x4 loads it."""
    return 4 * (i % 8) + (k % 8) // 2, 4 * (k // 8) + 2 * (i // 8) + k % 2


def _ldmatrix_b_layout(k, j):
    """A 16 x 16 float16 tile of B (K-major) as (lane, register): two n8 halves of PTX's m16n8k16 B fragment."""
    return 4 * (j % 8) + (k % 8) // 2, 4 * (j // 8) + 2 * (k // 8) + k % 2


def _fill():
    @T.prim_func(s_tir=True)
    def desc(c: T.handle) -> None:
        C = T.match_buffer(c, (WARP, 8), "float32", scope="warp")
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:WARP, 0:8])
            for i0, i1 in T.grid(16, 16):
                with T.sblock("C_warp"):
                    i, j = T.axis.remap("SS", [i0, i1])
                    lane, register = T.meta_var(_accumulator_layout(i, j))
                    T.reads()
                    T.writes(C[lane, register])
                    C[lane, register] = T.float32(0)

    @T.prim_func(s_tir=True)
    def impl(c: T.handle) -> None:
        C = T.match_buffer(c, (WARP, 8), "float32", scope="warp", offset_factor=1)
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:WARP, 0:8])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                T.evaluate(T.cuda.mma_fill_legacy(8, C.data, C.elem_offset, dtype="float32"))
    return desc, impl


def _store():
    """The accumulators to the block's shared tile, for the epilogue: each lane writes its registers
    (TVM's mma_store builtin would need tvm.s_tir.tensor_intrin.cuda's layout function registered)."""
    @T.prim_func(s_tir=True)
    def desc(c_warp: T.handle, c: T.handle) -> None:
        W = T.match_buffer(c_warp, (WARP, 8), "float32", scope="warp")
        C = T.match_buffer(c, (16, 16), "float32", scope="shared.dyn")
        with T.sblock("root"):
            T.reads(W[0:WARP, 0:8])
            T.writes(C[0:16, 0:16])
            for i0, i1 in T.grid(16, 16):
                with T.sblock("C_warp"):
                    i, j = T.axis.remap("SS", [i0, i1])
                    lane, register = T.meta_var(_accumulator_layout(i, j))
                    T.reads(W[lane, register])
                    T.writes(C[i, j])
                    C[i, j] = W[lane, register]

    @T.prim_func(s_tir=True)
    def impl(c_warp: T.handle, c: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        W = T.match_buffer(c_warp, (WARP, 8), "float32", scope="warp", offset_factor=1)
        C = T.match_buffer(c, (16, 16), "float32", scope="shared.dyn", offset_factor=1, strides=[s0, s1])
        with T.sblock("root"):
            T.reads(W[0:WARP, 0:8])
            T.writes(C[0:16, 0:16])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                for register in T.serial(8):
                    C[8 * (register % 4 // 2) + tx // 4, 8 * (register // 4) + tx % 4 * 2 + register % 2] = \
                        W[tx, register]
    return desc, impl


_PREFIXES = {"float16": "tvmconv_mma_f16", "float32": "tvmconv_mma_tf32"}


def register(names: set[str]) -> None:
    """Register the intrinsics among `names` that are this module's (a trace about to be replayed names them)."""
    for dtype, prefix in _PREFIXES.items():
        if any(name.startswith(prefix) for name in names):
            intrinsics(dtype)


@functools.cache
def intrinsics(dtype: str) -> Intrinsics:
    """The intrinsics of float16 ("float16") or TF32 ("float32") tiles, registered on first use."""
    prefix = _PREFIXES[dtype]
    names = Intrinsics(f"{prefix}_load_a", f"{prefix}_load_b", f"{prefix}_sync", f"{prefix}_fill",
                       f"{prefix}_store", _ldmatrix_a_layout if dtype == "float16" else _tf32_a_layout,
                       _ldmatrix_b_layout if dtype == "float16" else _tf32_b_layout)
    if dtype == "float16":
        # Lanes 0-15 point ldmatrix at rows 0-15 of the tile's left half, lanes 16-31 at its right half:
        # the four 8 x 8 matrices in the order of PTX's fragments (transposed for B, stored K-major).
        half = convert(16)

        def rows(tx, stride):
            return stride * (tx % half) + 8 * (tx // half)
        a = (_copy_desc(16, 16, 8, "float16", _ldmatrix_a_layout, "shared", 16), _ldmatrix_impl(8, False, rows))
        b = (_copy_desc(16, 16, 8, "float16", _ldmatrix_b_layout, "shared", 16), _ldmatrix_impl(8, True, rows))
        mma = _mma(16, "float16", "fp16")
    else:
        a = (_copy_desc(16, 8, 4, "float32", _tf32_a_layout, "shared", 8),
             _lanewise_impl(16, 8, 4, lambda tx, r: (tx // 4 + 8 * (r % 2), tx % 4 + 4 * (r // 2))))
        b = (_copy_desc(8, 16, 4, "float32", _tf32_b_layout, "shared", 16),
             _lanewise_impl(8, 16, 4, lambda tx, r: (tx % 4 + 4 * (r % 2), tx // 4 + 8 * (r // 2))))
        mma = _mma(8, "float32", "tf32")
    for name, pair in ((names.load_a, a), (names.load_b, b), (names.mma, mma), (names.fill, _fill()),
                       (names.store, _store())):
        s_tir.TensorIntrin.register(name, *pair, override=True)
    return names


# ---------------------------------------------------------------- the schedule


def _of_iterators(index_map, block, access) -> IndexMap:
    """`index_map`, a function of the conv block's seven iterators, as a function of the dimensions of the
    buffer that `access` of `block` reads or writes, each indexed by one of those iterators."""
    region = (block.reads if access[0] == "read" else block.writes)[access[1]].region
    iterators = [iv.var for iv in block.iter_vars]
    positions = [next(i for i, v in enumerate(iterators) if v.same_as(r.min)) for r in region]

    def mapped(*dims):
        values = [0] * len(iterators)
        for position, dim in zip(positions, dims, strict=True):
            values[position] = dim
        return index_map(*values)
    return IndexMap.from_func(mapped, ndim=len(positions), index_dtype=str(iterators[0].ty))


def _fragments(sch: s_tir.Schedule, block, height: int, width: int):
    """The innermost two loops of `block` tiled in height x width fragments; the fragment's outer loop."""
    i, j = sch.get_loops(block)[-2:]
    i0, i1 = sch.split(i, [None, height])
    j0, j1 = sch.split(j, [None, width])
    sch.reorder(i0, j0, i1, j1)
    return i1


def _spread(sch: s_tir.Schedule, block, knobs: Knobs) -> None:
    """The innermost two loops of `block` shared by the block's warps and their lanes (split by the two warp
    counts, not their product: a trace holds sampled values, not expressions of them)."""
    _, warps_m, warps_n, lane = sch.split(sch.fuse(*sch.get_loops(block)[-2:]), [None, knobs.warps_m, knobs.warps_n,
                                                                                  WARP])
    sch.bind(sch.fuse(warps_m, warps_n), "threadIdx.y")
    sch.bind(lane, "threadIdx.x")


def apply(sch: s_tir.Schedule, wl: ConvWorkload, knobs: Knobs) -> list[tuple]:
    """Schedule the convolution for the tensor cores with `knobs`, whose tiles may be sampled decisions, and
    return the (loop, intrinsic) pairs to tensorize: the caller tensorizes them last, after every other
    instruction (a trace without its Tensorize steps then still replays: the tests emulate it on a CPU).
    Every instruction's outputs depend on the workload alone, as MetaSchedule's trace replay requires."""
    names = intrinsics(wl.dtype)
    depth = _depth(wl)
    conv = sch.get_sblock("conv")
    kw, cg, out_h, out_w = wl.kernel_size[1], wl.group_in_channels, wl.out_height, wl.out_width

    def pixel(n, oh, ow):
        return (n * out_h + oh) * out_w + ow

    def tap(rh, rw, rc):
        return (rh * kw + rw) * cg + rc
    # The GEMM's form: A[pixel, tap] (the input's im2col), B[tap, filter], C[pixel, filter], padded to whole
    # tiles. The stages between them and x, the weights and the epilogue are inlined: A reads x itself (the
    # padding by bounds checks, channels-first by index), the epilogue the padded accumulators.
    def a_map(n, oh, ow, f, rh, rw, rc):
        return pixel(n, oh, ow), tap(rh, rw, rc)

    def b_map(n, oh, ow, f, rh, rw, rc):
        return tap(rh, rw, rc), f

    def c_map(n, oh, ow, f, rh, rw, rc):
        return pixel(n, oh, ow), f
    reindexed = []
    for access, index_map in ((("write", 0), c_map), (("read", 0), a_map), (("read", 1), b_map)):
        reindexed.append(sch.reindex(conv, access))
        # A reindexed buffer is indexed by the conv's iterators its access uses (not those of extent 1).
        by_iterator = _of_iterators(index_map, sch.get(conv), access)
        sch.transform_layout(conv, access, by_iterator)
        sch.transform_block_layout(reindexed[-1], by_iterator)
    store, a_stage, b_stage = reindexed
    sch.transform_block_layout(conv, lambda n, oh, ow, f, rh, rw, rc: (pixel(n, oh, ow), f, tap(rh, rw, rc)))
    sch.pad_einsum(conv, [M_PADDING, 16, depth])
    stages = []
    for producer, reindexed in zip(sch.get_producers(conv), (a_stage, b_stage), strict=True):
        if not sch.get(producer).same_as(sch.get(reindexed)):  # padded: the reindex feeds the padding
            sch.compute_inline(reindexed)
        stages.append(producer)
    (cropped,) = sch.get_consumers(conv)
    if not sch.get(cropped).same_as(sch.get(store)):
        sch.compute_inline(cropped)
    sch.compute_inline(store)
    if wl.has_data_pad:
        sch.compute_inline(sch.get_sblock("data_pad"))
    epilogue = sch.get_sblock("epilogue")
    layout = (lambda n, oh, ow, f: (pixel(n, oh, ow), f)) if wl.channels_last else (
        lambda n, f, oh, ow: (pixel(n, oh, ow), f))
    sch.transform_block_layout(epilogue, layout)
    # Tiles: a fragment (16 x 16 x depth) is one tensorized block; a block's warps share its tile.
    m, n, k = sch.get_loops(conv)
    m, m16 = sch.split(m, [None, 16])
    n, n16 = sch.split(n, [None, 16])
    k, k_depth = sch.split(k, [None, depth])
    sch.reorder(m, n, k, m16, n16, k_depth)
    fragment = sch.blockize(m16)
    m0, m1, m2 = sch.split(m, [None, knobs.warps_m, knobs.frags_m])
    n0, n1, n2 = sch.split(n, [None, knobs.warps_n, knobs.frags_n])
    k0, k1 = sch.split(k, [None, knobs.k_chunks])
    sch.reorder(m0, n0, m1, n1, k0, k1, m2, n2)
    block = sch.fuse(m0, n0)
    sch.bind(block, "blockIdx.x")
    warp = sch.fuse(m1, n1)
    sch.bind(warp, "threadIdx.y")
    # A reduction step's tiles of A and B in shared memory, loaded by all the block's threads; rows padded
    # by 8 elements, so that a warp's fragment loads hit distinct banks.
    for stage in stages:
        sch.set_scope(stage, 0, "shared")
        sch.compute_at(stage, k0, preserve_unit_loops=True)
        _spread(sch, stage, knobs)
        sch.storage_align(stage, 0, axis=-2, factor=32, offset=8)
    a_warp = sch.cache_read(fragment, 0, "warp")
    b_warp = sch.cache_read(fragment, 1, "warp")
    sch.compute_at(a_warp, k1, preserve_unit_loops=True)
    sch.compute_at(b_warp, k1, preserve_unit_loops=True)
    c_warp = sch.cache_write(fragment, 0, "warp")
    sch.reverse_compute_at(c_warp, warp, preserve_unit_loops=True)
    # The accumulators go to the block's tile in shared memory, which the epilogue reads.
    sch.set_scope(c_warp, 0, "shared.dyn")
    sch.reverse_compute_at(epilogue, block, preserve_unit_loops=True)
    _spread(sch, epilogue, knobs)
    load_a = _fragments(sch, a_warp, 16, depth)
    load_b = _fragments(sch, b_warp, depth, 16)
    store_c = _fragments(sch, c_warp, 16, 16)
    sch.decompose_reduction(fragment, k0)
    sch.transform_layout(a_warp, ("write", 0), lambda i, j: (i // 16, j // depth, *names.a_layout(i % 16, j % depth)))
    sch.transform_layout(b_warp, ("write", 0), lambda i, j: (i // depth, j // 16, *names.b_layout(i % depth, j % 16)))
    sch.transform_layout(c_warp, ("read", 0), lambda i, j: (i // 16, j // 16, *_accumulator_layout(i % 16, j % 16)))
    multiply, fill = sch.get_loops(conv)[-3], sch.get_loops(sch.get_sblock("conv_init"))[-2]
    return [(load_a, names.load_a), (load_b, names.load_b), (multiply, names.mma), (fill, names.fill),
            (store_c, names.store)]
