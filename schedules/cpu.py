"""The direct-convolution template for LLVM CPUs, and the rule class that x86, arm and any other CPU use.

Register blocking, as topi's x86 and arm_cpu schedules do it: each register tile is
`ow_tile` output columns x `f_vectors` vectors of filters, kept in registers (a "local"
accumulator) over the whole reduction, so every loaded weight vector feeds `ow_tile` FMAs and
every broadcast input value feeds `f_vectors`. The weights are packed (`compute.pack_weights`)
so a tile's weights are one contiguous stream. The epilogue (bias, activation, cast, and the
channels-first transpose) runs on the tile while it is still in registers. Outputs too narrow for
tiles of columns (7x7) get flat tiles instead (`Knobs.flat`): `ow_tile` pixels along the pixels of all
samples and rows as one axis, the epilogue then a pass of its own. Where a call's input and output outgrow
the last-level cache, the epilogue writes with non-temporal stores (`Knobs.stream_output`, x86).

Knobs are data: `default_knobs` picks defaults from the shape and a model of the core (`CpuCore`:
vector width, register count), which each family (x86.py, arm.py) derives from the target. The
autotuner (tvmconv.tuning) tunes the same template: `tunable_knobs` lists the variants that change
the program's structure or the packed weights' shape (one MetaSchedule design space each), and
`sample_tiles` turns the tile sizes into sampled decisions, which `apply` takes as it takes plain
integers. The gradient kernels that are not convolutions (tvmconv.backward) have fixed schedules here.
"""
import dataclasses
import functools
import itertools
import math
from collections.abc import Callable

from tvm import DataType, s_tir

from tvmconv import backward
from tvmconv.compute import LAST_AXIS_ACTIVATIONS, WINOGRAD_TILES, ConvWorkload
from tvmconv.targets import architecture, vector_bits


@dataclasses.dataclass(frozen=True)
class CpuCore:
    """A model of one CPU core, what the template's defaults are chosen from (`default_knobs`). Family modules
    (x86.py, arm.py) derive it from the target: the ISA's width and registers from LLVM's CPU model, the
    pipes from the microarchitecture, the caches from the host (/sys) or the CPU's data sheet."""
    vector_bits: int            # SIMD register width
    registers: int              # vector registers
    fma_ports: float = 2        # vector FMAs issued per cycle, at vector_bits
    fma_latency: int = 4        # cycles before an FMA's result feeds the next one
    # Chains in flight per FMA port and cycle of latency that keep the ports busy in a convolution's
    # inner loop: more than 1, since each step's FMAs wait on its broadcast loads. Fitted on Zen 3 to
    # sweeps of every tile on ResNet-50's and MobileNetV2's layers: 1.5. E.g. on the 1x1 layers of
    # width 7, tiles of 2 vectors x 5 columns (10 chains) ran 1.2-1.4x those of 2 x 4 (8 chains).
    chain_slack: float = 1.5
    load_ports: float = 2       # vector loads per cycle, at vector_bits
    broadcast_slots: float = 1  # load slots one broadcast of an input value takes
    l1_bytes: int = 32 << 10    # data cache per core
    l2_bytes: int = 1 << 20     # per core
    l2_bytes_per_cycle: int = 32  # what L2 sustains to L1 per cycle
    # The share of L2 that a layer's weights, read again for every row of tiles, can fill and still come
    # from L2. No cache tells it: 1 where no less was measured (Zen), the families' tables give less where it was.
    weights_l2_share: float = 1.0
    l3_bytes: int = 32 << 20    # the last-level cache, shared by the cores
    l3_bytes_per_cycle: int = 8  # what L3 sustains per core, all cores streaming
    # What memory sustains per core, all cores streaming: no cache or register tells it, so the families'
    # tables give what their machines measured. The default is the lowest seen (Zen 3: two threads read
    # 20 GB/s beyond L3, 3.4 bytes a cycle per core at the clock of its FMA peak).
    memory_bytes_per_cycle: float = 3.4
    cores: int = 1              # the cores a kernel's threads share out (the target's num-cores)
    # Vector stores that bypass the caches (x86's MOVNTPS), which the template can give a large output
    # (`Knobs.stream_output`); the family says (x86.py).
    nontemporal_stores: bool = False

    @property
    def weights_l2_bytes(self) -> int:
        """The most weights that stay in L2 from one row of tiles to the next (`weights_l2_share`)."""
        return int(self.l2_bytes * self.weights_l2_share)

    @property
    def accumulators(self) -> float:
        """Independent FMA chains that keep every FMA port busy: ports x latency x slack."""
        return self.fma_ports * self.fma_latency * self.chain_slack


ORDERS = ("rows", "filters", "pixels")
# The annotation on a loop whose stores to the output tvmconv.lowering makes non-temporal (`Knobs.stream_output`).
NONTEMPORAL_PRAGMA = "pragma_tvmconv_nontemporal"
CACHE_LINE_BYTES = 64  # on every x86 and Arm core we target


@dataclasses.dataclass(frozen=True)
class Knobs:
    lanes: int          # vector width in accumulator elements
    f_vectors: int      # filter vectors per register tile (unrolled)
    ow_tile: int        # output columns per register tile (unrolled)
    oh_tile: int = 1    # output rows per register tile (unrolled)
    rc_tile: int = 0    # input channels per inner reduction step; 0 = all of them
    # The loop order of the tiles (`ORDERS`): "rows" (rows, then filter blocks, then columns), "filters" (filter
    # blocks outermost: each block's weights stay in cache over all rows) or "pixels" (rows, columns, then
    # filter blocks: each pixel's channels are read and written in one stream).
    order: str = "rows"
    pad_inline: bool = False  # read the input through bound checks instead of a padded copy
    unroll_window: bool = False  # unroll the kernel window: neighbouring taps share loaded input vectors
    # Tile the pixels of all samples and rows as one axis, ow_tile pixels a tile (oh_tile unused): tiles
    # then need not divide the width (7x7 layers) and the epilogue runs as a pass of its own.
    flat: bool = False
    # Winograd F(winograd, 3) (compute.conv2d_forward) instead of the direct sum: the tile sizes above are
    # then those of its batched product, `ConvWorkload.winograd_gemm`'s (one row, a tile a "pixel"). 0: direct.
    winograd: int = 0
    # Winograd in chunks of this many rows of tiles (of one image), each chunk taken through every stage by one
    # thread while its transformed tiles are in cache (`_winograd_chunks`); the defaults and the tuner then take an
    # ow_tile that divides a chunk's tiles (another leaves TVM keeping the accumulators in memory, correct but slow).
    # 0: each stage over all tiles, in parallel, before the next.
    chunk_rows: int = 0
    # Write the output with non-temporal stores (the epilogue's vector loop marked NONTEMPORAL_PRAGMA, which
    # tvmconv.lowering turns into them), where a call's input and output outgrow the last-level cache
    # (`_streams_output`): a plain store first reads the output's line from memory, one pass more.
    stream_output: bool = False

    def __post_init__(self):
        # Tile sizes given as numbers must be usable; tuning passes sampled decisions instead (`sample_tiles`),
        # drawn from usable sizes.
        for name, least in (("lanes", 1), ("f_vectors", 1), ("ow_tile", 1), ("oh_tile", 1), ("rc_tile", 0),
                            ("chunk_rows", 0)):
            value = getattr(self, name)
            if isinstance(value, int) and (isinstance(value, bool) or value < least):
                raise ValueError(f"Knobs.{name} must be an int of at least {least}, got {value!r}")
        if self.order not in ORDERS:
            raise ValueError(f"Knobs.order must be one of {', '.join(map(repr, ORDERS))}, got {self.order!r}")
        if self.winograd not in (0, *WINOGRAD_TILES) or (self.winograd and self.flat):
            raise ValueError(f"Knobs.winograd must be one of {', '.join(map(str, (0, *WINOGRAD_TILES)))}, and 0 "
                             f"with flat tiles; got {self.winograd!r} (flat={self.flat})")
        if self.chunk_rows and not self.winograd:
            raise ValueError(f"Knobs.chunk_rows chunks Winograd's tiles: it must be 0 without Winograd; got "
                             f"chunk_rows={self.chunk_rows!r} with winograd=0")
        if not isinstance(self.stream_output, bool) or (self.stream_output and self.winograd):
            raise ValueError(f"Knobs.stream_output must be a bool, and False with Winograd; got "
                             f"{self.stream_output!r} (winograd={self.winograd})")

    @property
    def weight_block(self) -> int:
        """Filters per packed weight block: one register tile's width."""
        return self.lanes * self.f_vectors

    @property
    def flat_tile(self) -> int:
        """The pixel tile the compute's flat conv stage is padded to (compute.conv2d_forward); 0: not flat."""
        return self.ow_tile if self.flat else 0

    @property
    def layout(self) -> tuple[int, int, int]:
        """The PrimFunc these knobs schedule: workload.prim_func(*layout)."""
        return self.weight_block, self.flat_tile, self.winograd


def target_cores(target) -> int:
    """The cores a target's kernels share their work among (`num-cores`, which tvmconv.targets sets)."""
    return int(target.attrs.get("num-cores", 1))


def lanes(wl: ConvWorkload, core: CpuCore) -> int:
    return max(core.vector_bits // (64 if wl.accum_dtype == "float64" else 32), 1)


def _element_bytes(wl: ConvWorkload) -> int:
    """Bytes of one accumulator element, as the model counts the bytes a loop order or a pass streams."""
    return 8 if wl.accum_dtype == "float64" else 4


def _peak_cycles(core: CpuCore, wl: ConvWorkload) -> float:
    """Cycles the workload's FLOPs take at the core's FMA peak."""
    return wl.flops / (2 * core.fma_ports * core.vector_bits // (8 * _element_bytes(wl)))


def _used(extent: int, tile: int) -> float:
    """The share of a tiled loop's iterations that do work: a tile overhanging the extent idles."""
    return extent / (-(-extent // tile) * tile)


def _tile_efficiency(core: CpuCore, wl: ConvWorkload, n_lanes: int, ow: int, oh: int, fv: int) -> float:
    """The share of the FMA peak a register tile of ow x oh output pixels x fv filter vectors reaches in its
    inner loop. Each reduction step issues ow·oh·fv FMAs, loads fv weight vectors and broadcasts ow·oh
    input values; it takes at least as long as the FMA ports and the load ports need, and as each
    accumulator's chain needs (`CpuCore.accumulators` chains keep the ports busy), and, when a filter
    block's weights for the whole reduction outgrow L1, as long as L2 takes to deliver the step's weight
    vectors."""
    fmas, bytes_per_element = ow * oh * fv, _element_bytes(wl)
    cycles = max(fmas / core.fma_ports, (fv + core.broadcast_slots * ow * oh) / core.load_ports,
                 core.accumulators / core.fma_ports)
    block_bytes = wl.kernel_size[0] * wl.kernel_size[1] * wl.group_in_channels * fv * n_lanes * bytes_per_element
    if block_bytes > core.l1_bytes * 3 // 4:
        cycles = max(cycles, fv * n_lanes * bytes_per_element / core.l2_bytes_per_cycle)
    return fmas / core.fma_ports / cycles


# A tile that overhangs the output's width costs more than its idle share: its bound check sits in the
# innermost loops (up to 20% on 1x1 layers, Zen 4). Tiles of several rows divide the height: one that
# overhangs it cost 7x7 1x1 layers half their speed (Zen 3).
_WIDTH_TAIL_COST = 0.8
# The most accumulators of a tile of several rows that reads through bound checks (see default_knobs).
_CHECKED_ACCUMULATORS = 8


def _tile_score(core: CpuCore, wl: ConvWorkload, n_lanes: int, ow: int, oh: int, fv: int) -> float:
    """The tile's efficiency, discounted for the idle part of tiles that overhang the output."""
    tail = 1.0 if wl.out_width % ow == 0 else _WIDTH_TAIL_COST
    return (_tile_efficiency(core, wl, n_lanes, ow, oh, fv) * _used(wl.out_width, ow) * tail
            * _used(wl.out_height, oh) * _used(wl.filters, fv * n_lanes))


def _filters_first(core: CpuCore, wl: ConvWorkload, block: int) -> bool:
    """Whether filter blocks go outermost: only where rows first would stream more bytes from beyond L2 than
    L3 and memory deliver while the FMAs run, and filters first streams fewer. Rows first reads every
    filter block once per row, so all the weights again for each row once they outgrow the share of L2
    that keeps them (`CpuCore.weights_l2_bytes`; ResNet-50's 7x7x512 layers: 66 MB); filters first reads
    the whole input once per filter block, once the input outgrows L2: the part of it the windows read, a
    1x1 kernel of stride 2 every other row and column (ResNet-50's conv1x1s2_28x28x512_to1024 at batch 8 on
    Sapphire Rapids, tiles of 7 columns x 2 vectors: filter blocks first 1.15x rows first, which counting the
    whole input chose)."""
    bytes_per_element = _element_bytes(wl)
    weights = math.prod(wl.weights_shape) * bytes_per_element
    read = math.prod(min(1.0, k / stride) for k, stride in zip(wl.kernel_size, wl.strides))
    image = math.prod(wl.input_shape) * bytes_per_element * read
    rows, blocks = wl.batch * wl.out_height, -(-wl.filters // block)
    rows_first = weights * (rows if weights > core.weights_l2_bytes else 1) + image
    filters_first = image * (blocks if image > core.l2_bytes else 1) + weights
    return rows_first / core.l3_bytes_per_cycle > _peak_cycles(core, wl) and filters_first < rows_first


def _pixels_first(core: CpuCore, wl: ConvWorkload, block: int) -> bool:
    """Whether each tile runs every filter block before the next tile: where there are several blocks, the
    output is over twice L2 and the weights stay in L2 (`CpuCore.weights_l2_bytes`). Rows first writes a
    row's pixels once per filter block, a block's share of each pixel at a time, and those strided writes
    then go beyond L2; pixels first writes each pixel whole, one stream, and reads all the weights once per
    tile, from L2. Measured on Zen 4 at batch 8: 1.02-1.41x rows first on the 1x1 layers of ResNet-50 and
    MobileNetV2 of width 14 to 112 (Zen 3's code there: 1.03-1.15x), 1.0-1.02x on the 3x3 ones of width 28
    and 56; at batch 1, 1.0-1.01x where the output was over twice L2, 0.9x on three where it was not
    (0.6-1.6 MB; L2: 1 MB)."""
    bytes_per_element = _element_bytes(wl)
    weights = math.prod(wl.weights_shape) * bytes_per_element
    output = math.prod(wl.output_shape) * bytes_per_element
    return wl.groups == 1 and wl.filters > block and output > 2 * core.l2_bytes and weights <= core.weights_l2_bytes


def _depthwise(wl: ConvWorkload) -> bool:
    return wl.groups == wl.in_channels == wl.filters


def _streams_output(wl: ConvWorkload, core: CpuCore) -> bool:
    """Whether the direct sum writes its output with non-temporal stores (`Knobs.stream_output`): where the core
    has them, the epilogue writes the layer's output (channels last, no last-axis activation after it), a call's
    input and output outgrow half the last-level cache (neither stays there from one call to the next, so a plain
    store first reads each output line from memory) and the output alone a quarter of it (the read saved is a
    large share of the call's traffic). Measured on Zen 4 (32 MiB of L3), kernels alone taking turns on one input
    and one output array (medians of 31 turns' ratios): at batch 8 MobileNetV2's conv1x1_112x112x16_to96 ran
    1.48x, dwconv3x3_56x56x144 1.49x, conv1x1_56x56x24_to144 1.41x, dwconv3x3_112x112x32 1.31x, ResNet-50's
    conv1x1_56x56x64_to256 1.05x and 7x7 stem 1.03x, at batch 4 conv1x1_112x112x16_to96 1.19x; with a small
    output, conv1x1_56x56x144_to24 (2.4 of 17 MB) 0.97x, conv1x1_56x56x256_to64 1.03x; where input and output
    fit, dwconv3x3_112x112x32 at batch 2 and 4 0.92x and 0.96x. The epilogue vectorized in TIR with plain stores
    (what the non-temporal ones need) ran 0.78-0.99x at batch 8: the gains are the stores'. (Winograd's chunks keep
    plain stores: its conv3x3_56x56x64 at batch 8 ran 0.98x.)

    Where a vector is narrower than a cache line (AVX2: two non-temporal stores fill a line, and the core's
    write-combining buffers must join them), only depthwise layers stream, whose tiles write consecutive pixels
    of one row. Measured on Zen 3 at batch 8, the same way (15 turns): depthwise 1.08-1.18x streamed, the 7x7
    stem 1.03x, the other direct sums 0.59-1.09x (conv1x1_112x112x16_to96 0.59x, conv1x1_56x56x64_to256 0.80x,
    conv1x1_56x56x24_to144 1.09x, four more 0.95-0.97x), where their tiles write 4 rows at once."""
    if not core.nontemporal_stores or not wl.channels_last or wl.activation in LAST_AXIS_ACTIVATIONS:
        return False
    if core.vector_bits < 8 * CACHE_LINE_BYTES and not _depthwise(wl):
        return False
    output = math.prod(wl.output_shape) * _element_bytes(wl)
    return output > core.l3_bytes // 4 and math.prod(wl.input_shape) * _element_bytes(wl) + output > core.l3_bytes // 2


def default_knobs(wl: ConvWorkload, core: CpuCore, winograd: bool = True) -> Knobs:
    """Default knobs for this core: Winograd where it pays (`_winograd_choice`; winograd=False: the direct sum,
    what scripts/bench_winograd.py measures it against), the register tile the model of the core scores best,
    and the loop order that streams the fewest bytes from beyond L2, and the reduction's step
    (`_reduction_step`), named as the number the template samples (`sample_tiles`), so the defaults are a
    program of the tuner's space (tvmconv.tuning measures it and its neighbours first)."""
    depthwise, stream = _depthwise(wl), _streams_output(wl, core)
    # A vector's lanes must read one input channel (one group), or consecutive ones in depthwise
    # convolutions, and must not run past the last filter: else each lane is gathered or predicated.
    # So small groups get narrower vectors, e.g. 4 lanes for ResNeXt's 4 filters per group.
    n_lanes = lanes(wl, core)
    while (wl.filters if depthwise else wl.filters // wl.groups) % n_lanes:
        n_lanes //= 2
    if depthwise:
        # One FMA per loaded input vector, so memory decides: small tiles (measured best: 4 columns x
        # 2 vectors, 2 columns at stride 2: 1.1-1.5x 4 on MobileNetV2's 112x112 and 56x56 layers, Zen 3),
        # padding by bound checks (no extra pass over the input), an unrolled window, so that
        # neighbouring taps share loaded input vectors (`_window_unrollable`), and each pixel's channels
        # in one stream (`order="pixels"`: on Zen 3, MobileNetV2's depthwise layers ran 1.1-1.4x rows
        # first at batch 1 and 1.0-1.6x at batch 8, the 112x112 and 56x56 ones most).
        fv = 2 if wl.filters % (2 * n_lanes) == 0 else 1
        widest = 4 if wl.strides[1] == 1 else 2
        ow = max(range(1, min(wl.out_width, widest) + 1), key=lambda c: (_used(wl.out_width, c), c))
        if wl.strides[1] == 1 and ow < widest:
            # No tile of 4 columns divides the width (7, 14): rather than 1 or 2 columns, the widest that
            # divides it, up to 7, of one vector (7 accumulators and the 9 input vectors they read fit 16
            # registers). On MobileNetV2's 3x3 layers of width 7 and 14: 1.15-2.6x the 1 or 2 columns of 2
            # vectors on Zen 4 at batch 1 and 8, 1.4-2.9x with Zen 3's code there.
            ow, fv = max(c for c in range(1, 8) if wl.out_width % c == 0), 1
        return Knobs(n_lanes, fv, ow, rc_tile=wl.group_in_channels, order="pixels", pad_inline=True,
                     unroll_window=_window_unrollable(wl), stream_output=stream)
    m, chunk_rows = _winograd_choice(wl, core) if winograd else (0, 0)
    if m:
        gemm = wl.winograd_gemm(m)
        ow, oh, fv = _best_rectangle(core, gemm, n_lanes, _chunk_tiles(wl, m, chunk_rows))
        # The product's rows are the transform's points, each with weights of its own, read once in any
        # order: none must stay in L2 from one row to the next (on Sapphire Rapids, ResNet-50's conv3x3_7x7x512
        # at batch 1 ran F(2, 3)'s rows first at 1.08x filter blocks first).
        order = _order(dataclasses.replace(core, weights_l2_share=1.0), gemm, n_lanes * fv)
        return Knobs(n_lanes, fv, ow, oh, _reduction_step(gemm), order=order, winograd=m, chunk_rows=chunk_rows)
    (ow, oh, fv), flat, _ = _direct_tile(core, wl, n_lanes)
    if flat:
        # Flat tiles run pixels first: each tile's input stays in cache while every filter block's weights
        # stream past; on the 7x7 layers that ran 0.98-1.3x rows first and mostly 1.0-1.5x filters first at
        # batch 1 and 8 (ResNet-50's 1x1 stride-2 one at batch 8: 0.81-0.98x in three runs), except where a
        # window's taps multiply a tile's input beyond L1 and the whole input outgrows L2: ResNet-50's 3x3
        # layers of width 7 at batch 8 ran filters first at 1.2-1.3x (each block's weights then stay in L2).
        input_bytes = math.prod(wl.input_shape) * _element_bytes(wl)
        window_beyond_l2 = wl.kernel_size != (1, 1) and input_bytes > core.l2_bytes
        return Knobs(n_lanes, fv, ow, rc_tile=_reduction_step(wl), order="filters" if window_beyond_l2 else "pixels",
                     flat=True, stream_output=stream)
    # Padding only after the input (stride 2, "same", even sizes) is read through two bound checks against the far
    # edges rather than copied: on Zen 3 that ran 1.06-1.2x the copy on ResNet-50's 3x3 stride-2 layers of width
    # 28 and 56 and 1.0-1.4x on MobileNetV2's first layer (batch 1, 8), where checks on all four sides (3x3, 7x7,
    # stride 1) ran 0.6-0.98x. The checks sit in the reduction loop, where LLVM must unswitch them; for a tile
    # of several rows and more than 8 accumulators it may not, and then keeps accumulators in memory: on Zen 4
    # the 2x2-pixel tile of 4 vectors (16) ran 0.65x the copy on ResNet-50's conv3x3s2_28x28x256 (its assembly
    # stores 6 accumulators in the loop), where 2x2 of 2 vectors (8) ran 1.0x there and 1.06-1.2x on Zen 3, and
    # one-row tiles 1.02-1.05x. (Some larger tiles unswitched: 7x2 of 2 vectors ran 1.02x; no rule tells them apart.)
    return Knobs(n_lanes, fv, ow, oh, _reduction_step(wl), order=_order(core, wl, n_lanes * fv),
                 pad_inline=_pads_inline(wl, ow, oh, fv), stream_output=stream)


# Input channels per reduction step of a 1x1 kernel (and of Winograd's product, one too). The step's loop is
# unrolled, so the tile's broadcasts and weight loads for 4 channels issue between one loop branch and the
# next. On Sapphire Rapids, kernels alone, 4-channel steps against all channels in one loop: ResNet-50's 1x1
# layers 0.99-1.11x at batch 8 and 0.95-1.15x at batch 1 (13 of 15 layers at 1.02x or more), MobileNetV2's
# 0.98-1.08x and 0.99-1.10x (those of 384 channels and more 1.03-1.08x at batch 8); Winograd F(4, 3)'s and
# F(2, 3)'s products on ResNet-50's 3x3 layers 1.00-1.09x. Steps of 8 ran alike, of 16 0.94-1.01x. A window's
# taps are looped over inside each step (`apply`), so there a step of 4 channels reads the window's input 4
# channels at a time: ResNet-50's 3x3 stride-2 layers ran 0.83-0.93x; those keep all channels in one step.
_POINTWISE_STEP = 4


def _reduction_step(wl: ConvWorkload) -> int:
    """The default rc_tile: `_POINTWISE_STEP` channels for a 1x1 kernel whose group's channels it divides, else
    all of the group's channels."""
    cg = wl.group_in_channels
    return _POINTWISE_STEP if wl.kernel_size == (1, 1) and cg % _POINTWISE_STEP == 0 else cg


def _pads_after_only(wl: ConvWorkload) -> bool:
    return wl.channels_last and any(wl.pads) and not any(wl.pads[:2])


def _pads_inline(wl: ConvWorkload, ow: int, oh: int, fv: int) -> bool:
    """Whether a tile reads the input's padding through bound checks rather than a padded copy (see above)."""
    return _pads_after_only(wl) and (oh == 1 or ow * oh * fv <= _CHECKED_ACCUMULATORS)


def _direct_tile(core: CpuCore, wl: ConvWorkload, n_lanes: int) -> tuple[tuple[int, int, int], bool, float]:
    """The direct sum's register tile the model scores best: ((columns, rows, filter vectors), whether flat
    (its columns then pixels), its score). Where the width holds less than two tiles of 4 columns (7x7
    layers: 5 columns with a tail, or 7 of one vector), flat tiles of any number of pixels may do better, at
    the cost of the epilogue's pass. Measured on Zen 3: on the 7x7 layers of ResNet-50 and MobileNetV2,
    1.1-2.3x the rectangles; on wider layers 0.5-1.0x mostly, the 1x1 ones worst (for them tall tiles beat
    wide ones, and flat tiles are wide)."""
    rectangle = _best_rectangle(core, wl, n_lanes)
    score = _rectangle_score(core, wl, n_lanes, *rectangle)
    for pixels, fv in _flat_tiles(core, wl, n_lanes)[:1]:
        flat_score = _flat_score(core, wl, n_lanes, pixels, fv)
        if flat_score > score:
            return (pixels, 1, fv), True, flat_score
    return rectangle, False, score


def _best_rectangle(core: CpuCore, wl: ConvWorkload, n_lanes: int, width_divides: int = 0) -> tuple[int, int, int]:
    """The register tile (columns, rows, filter vectors) of rows and columns that the model scores best; with
    `width_divides`, of a width that divides it (a Winograd chunk's tiles, `_chunk_tiles`)."""
    candidates = [(ow, oh, fv) for ow, oh, fv in itertools.product(_widths(wl, width_divides), (1, 2, 4),
                                                                   _vector_counts(wl, n_lanes))
                  if wl.out_height % oh == 0 and _fits(core.registers, fv, ow, oh)]
    # Ties go to the tile with the most FMAs per load (fewer loads leave room for what the model omits),
    # then to the widest, except for 1x1 kernels: to the tallest. A wide tile's columns share the input
    # lines of a window's taps; a 1x1 kernel has none to share (Zen 3, ResNet-50: 1 column x 4 rows ran
    # 1.0-1.5x 4 columns x 1 row on the 1x1 layers of width 14 to 56, and 0.9-1.0x on the 3x3 layers).
    pointwise = wl.kernel_size == (1, 1)
    return max(candidates, key=lambda c: (round(_rectangle_score(core, wl, n_lanes, *c), 6),
                                          c[0] * c[1] * c[2] / (c[0] * c[1] + c[2]),
                                          (c[1], c[0]) if pointwise else (c[0], c[1])))


def _rectangle_score(core: CpuCore, wl: ConvWorkload, n_lanes: int, ow: int, oh: int, fv: int) -> float:
    """The tile's score (`_tile_score`), discounted, where the input is padded only after it, for the pass of
    the padded copy that a tile which cannot read it in place takes (`_pads_inline`). On Sapphire Rapids,
    ResNet-50's conv3x3s2_56x56x128: the copy cost 4% at batch 1 and 10% at batch 8 for the same tile, and a tile
    of 4 x 2 pixels x 2 vectors, which copies, had been chosen over one of 7 x 1 x 2 that reads in place."""
    score = _tile_score(core, wl, n_lanes, ow, oh, fv)
    if not _pads_after_only(wl) or _pads_inline(wl, ow, oh, fv):
        return score
    return _with_pass(core, wl, score, math.prod(wl.input_shape) * _element_bytes(wl))


def _with_pass(core: CpuCore, wl: ConvWorkload, score: float, size: int) -> float:
    """`score` discounted for a pass besides the kernel's loops that reads and writes `size` bytes."""
    compute_cycles = _peak_cycles(core, wl) / score
    return score * compute_cycles / (compute_cycles + 2 * size / _stream_rate(core, size))


def _order(core: CpuCore, wl: ConvWorkload, block: int) -> str:
    return "filters" if _filters_first(core, wl, block) else "pixels" if _pixels_first(core, wl, block) else "rows"


def _winograd_choice(wl: ConvWorkload, core: CpuCore) -> tuple[int, int]:
    """(m, chunk rows): Winograd F(m, 3) (`WINOGRAD_TILES`) and its chunks' rows of tiles (`Knobs.chunk_rows`;
    0: its stages over all tiles), or (0, 0) for the direct sum: the fewest cycles the model of the core gives
    each (`_cycles`), where Winograd applies (`ConvWorkload.winograd_applies`) to float32 channels-last layers
    of 16 channels and filters or more. F(4, 3) multiplies 36 times per 16 output pixels where the direct sum
    does 144, F(2, 3) 16 per 4, but their transformed weights are 4x and 1.8x the direct sum's, read by as many
    tiles as the output has: at batch 1 on a 7x7 layer, 4 tiles of F(4, 3), so ResNet-50's 512-channel one
    streams 38 MB a call from memory. There on Zen 3 (20 GB/s from memory) F(4, 3) ran 0.7-1.0x the direct sum
    and F(2, 3), 17 MB read by 16 tiles, 1.0-1.3x, where on Zen 4 F(4, 3) ran 2.5x the direct sum. Elsewhere
    on Zen 4 F(4, 3) ran ResNet-50's 3x3 stride-1 layers at 2.1-2.8x the direct kernels at batch 1 and 1.6-2.6x
    at batch 8, within 7e-6 of float64 relative to the largest output (scripts/bench_winograd.py); F(2, 3)
    1.6-2.1x at batch 1 (the probe of commit 21ae2c2).
    Stages over all tiles write the transformed tiles out and read them back, in and out, from beyond L2 once
    there are many; chunks keep them in L2 but read the weights once per chunk (`_chunk_rows`).
    Fewer channels leave the product too small to pay for the transforms; float16 would round the
    transformed weights (their entries grow to 4x), and channels-first inputs would be gathered."""
    n_lanes = lanes(wl, core)
    if not (wl.winograd_applies and wl.dtype == "float32" and wl.channels_last
            and min(wl.in_channels, wl.filters) >= 16 and wl.filters % n_lanes == 0):
        return 0, 0
    bytes_per_element = _element_bytes(wl)
    cycles = {(0, 0): _cycles(core, wl, _direct_tile(core, wl, n_lanes)[2],
                              math.prod(wl.weights_shape) * bytes_per_element)}
    for m in WINOGRAD_TILES:
        gemm = wl.winograd_gemm(m)
        weights = gemm.batch * math.prod(gemm.weights_shape) * bytes_per_element
        # The transforms write the product's input and read its output, which the product reads and writes.
        transformed = gemm.batch * gemm.out_width * (gemm.in_channels + gemm.filters) * bytes_per_element
        for rows in {0, _chunk_rows(core, wl, m)}:
            tiles = _chunk_tiles(wl, m, rows)
            score = _tile_score(core, gemm, n_lanes, *_best_rectangle(core, gemm, n_lanes, tiles))
            # Chunks read the weights once each, and hand the transformed tiles on in L2.
            reads, rate = (gemm.out_width // tiles, core.l2_bytes_per_cycle) if rows else (
                1, _stream_rate(core, transformed))
            cycles[m, rows] = _cycles(core, gemm, score, weights, reads) + 2 * transformed / rate
    return min(cycles, key=cycles.get)


def _chunk_tiles(wl: ConvWorkload, m: int, rows: int) -> int:
    """The tiles of a Winograd chunk of `rows` rows of F(m, 3)'s tiles (0: no chunks)."""
    return rows * wl.winograd_tiles(m)[1] if rows else 0


def _chunk_rows(core: CpuCore, wl: ConvWorkload, m: int) -> int:
    """The rows of tiles of the Winograd chunks the model would take, 0 for none: rows that divide an image's,
    with a chunk for every core, the most whose transformed tiles, in and out, fit in L2 beside the weights
    where those fit there too (every chunk reads them all), else the fewest. On Zen 4, kernels alone, ResNet-50's
    3x3 layer of width 56 (590 KB of weights) ran 1.49x the stages over all tiles at batch 1 and 1.86x at batch 8
    in chunks of one row (848 KB with the weights; two rows, 1.1 MB: 0.87x and 0.95x of that); the layer of width
    14 (9.4 MB of weights, from L3) 1.03x and 1.28x in chunks of two rows; in a prototype, chunks of its image's 4
    rows (1.2 MB) 1.22-1.29x, of one row 1.14-1.21x (docs/benchmark_history.md, Zen 4, "Winograd in chunks")."""
    rows, columns = wl.winograd_tiles(m)
    bytes_per_element = _element_bytes(wl)
    weights = (m + 2) ** 2 * wl.in_channels * wl.filters * bytes_per_element
    per_row = columns * (m + 2) ** 2 * (wl.in_channels + wl.filters) * bytes_per_element
    beside = weights if weights <= core.l2_bytes else 0
    options = [r for r in range(1, rows + 1) if rows % r == 0 and wl.batch * rows // r >= core.cores]
    fitting = [r for r in options if r * per_row + beside <= core.l2_bytes]
    return max(fitting) if fitting else min(options, default=0)


def _cycles(core: CpuCore, wl: ConvWorkload, score: float, weight_bytes: int, reads: int = 1) -> float:
    """Cycles of a kernel whose tiles reach `score` of the FMA peak, or that its weights take to stream in
    `reads` times, whichever is more (the FMAs run while they stream)."""
    return max(_peak_cycles(core, wl) / score, reads * weight_bytes / _stream_rate(core, weight_bytes))


def _flat_tiles(core: CpuCore, wl: ConvWorkload, n_lanes: int) -> list[tuple[int, int]]:
    """The flat tiles (pixels, filter vectors) that fit, best first by `_flat_score` (ties: most FMAs per
    load); none for depthwise layers or where the width holds two tiles of 4 columns (see default_knobs)."""
    if wl.out_width >= 8 or _depthwise(wl):
        return []
    scores = {(t, v): round(_flat_score(core, wl, n_lanes, t, v), 6)
              for t, v in itertools.product(range(1, 17), _vector_counts(wl, n_lanes)) if _fits(core.registers, v, t)}
    return sorted(scores, key=lambda c: (scores[c], c[0] * c[1] / (c[0] + c[1])), reverse=True)


def _flat_score(core: CpuCore, wl: ConvWorkload, n_lanes: int, pixels: int, fv: int) -> float:
    """A flat tile's score (`Knobs.flat`): its efficiency, discounted for the idle pixels of its last tile and
    for the epilogue's pass, which writes the conv stage and reads it back (`_stream_rate`)."""
    total = wl.batch * wl.out_height * wl.out_width
    score = (_tile_efficiency(core, wl, n_lanes, pixels, 1, fv) * _used(total, pixels)
             * _used(wl.filters, fv * n_lanes))
    return _with_pass(core, wl, score, total * wl.filters * _element_bytes(wl))


def _stream_rate(core: CpuCore, size: int) -> float:
    """Bytes per cycle and core at which a pass streams `size` bytes: L2's rate where they fit there, L3's
    where they fit half of it (other cores and tenants share it: on Zen 3, whose L3 is 32 MB, two threads
    read 16 MB at 60 GB/s, 24 MB at 29 and 64 MB at 22), else memory's."""
    if size <= core.l2_bytes:
        return core.l2_bytes_per_cycle
    return core.l3_bytes_per_cycle if size <= core.l3_bytes // 2 else core.memory_bytes_per_cycle


def _vector_counts(wl: ConvWorkload, n_lanes: int) -> list[int]:
    """Filter vectors per tile (1 to 4) whose width divides the filters. A tile that overhangs the last
    filter needs a bound check inside the innermost loops: it ran 40% slower on ResNet-50's 512-filter
    layers with 3 vectors of 16 than with 2 (Zen 4)."""
    return [fv for fv in range(1, 5) if wl.filters % (fv * n_lanes) == 0] or [1]


def _fits(registers: int, fv: int, ow: int, oh: int = 1) -> bool:
    """The tile's accumulators, its weight vectors, one broadcast and two spare fit in the registers
    (a tile that left one of 32 AVX-512 registers spare, 14 columns x 2 vectors, ran 25% slower than 7 x 2;
    on Zen 3 with 16, one spare was enough for some: 2 vectors x 6 columns, or 3 columns x 2 rows, ran
    1.04-1.16x the default 2 x 4 on ResNet-50's 3x3 layers of width 56 and 28, where 4 x 3 and 2 x 7 spilled
    at 0.4x; but 3 x 2 ran 0.4-0.5x the default on its 1x1 layers of width 56, and 6 columns 0.63x on
    MobileNetV2's first layer. Not changed: no rule told them apart)."""
    return oh * ow * fv + fv + 3 <= registers


def _window_unrollable(wl: ConvWorkload) -> bool:
    """Up to 7x7 taps. Huge windows, such as the kernel gradient's (tvmconv.backward: dz as the kernel,
    e.g. 56x56), unrolled run slower (3.7x, depthwise) or build for minutes (the tuner timed out)."""
    return 1 < wl.kernel_size[0] * wl.kernel_size[1] <= 49


def tunable_knobs(wl: ConvWorkload, core: CpuCore) -> list[Knobs]:
    """The template's structural variants, tile sizes left at their defaults (`sample_tiles` samples them):
    every filter-vector count that fits and is not wasted, each with every loop order, padding
    method and window unrolling that applies; and where flat tiles apply (`_flat_tiles`), the same with
    flat tiles, each vector count with its best-scoring number of pixels. A flat tile shapes the compute
    (the conv stage's pixels are padded to its multiple), so it is no sampled decision: each is a task of
    its own (tvmconv.tuning.tasks), and one per vector count keeps the trials from spreading thin. Where
    the defaults take Winograd (`_winograd_choice`), its variants come first (its product's rectangles, one
    row each, every order; in the defaults' chunks first, where they take chunks, then over all tiles), in
    tasks of their own; the direct sum's stay in the space."""
    registers = core.registers
    n_lanes = default_knobs(wl, core).lanes
    vector_counts = [fv for fv in _vector_counts(wl, n_lanes) if _fits(registers, fv, 1)]
    flat_pixels = {}
    for pixels, fv in _flat_tiles(core, wl, n_lanes):
        flat_pixels.setdefault(fv, pixels)
    tiles = [(fv, _widest(wl, registers, fv), False)
             for fv in vector_counts] + [(fv, pixels, True) for fv, pixels in flat_pixels.items()]
    stream = _streams_output(wl, core)
    direct = [Knobs(n_lanes, fv, ow, order=order, pad_inline=pad_inline, unroll_window=unroll_window, flat=flat,
                    stream_output=stream)
              for (fv, ow, flat), order, pad_inline, unroll_window in itertools.product(
                  tiles, ORDERS, (False, True) if wl.has_data_pad else (False,),
                  (False, True) if _window_unrollable(wl) else (False,))]
    m, chunk_rows = _winograd_choice(wl, core)
    if not m:
        return direct
    gemm = wl.winograd_gemm(m)
    return [Knobs(n_lanes, fv, _widest(gemm, registers, fv, _chunk_tiles(wl, m, rows)), order=order, winograd=m,
                  chunk_rows=rows)
            for rows, fv, order in itertools.product(dict.fromkeys((chunk_rows, 0)), _vector_counts(gemm, n_lanes),
                                                     ORDERS) if _fits(registers, fv, 1)] + direct


def _widths(wl: ConvWorkload, divides: int = 0) -> list[int]:
    """Register tiles' widths: up to 16 columns, those that divide `divides` where it is given."""
    return [c for c in range(1, min(wl.out_width, 16) + 1) if not divides or divides % c == 0]


def _widest(wl: ConvWorkload, registers: int, fv: int, divides: int = 0) -> int:
    """The most columns (up to 16; dividing `divides` where given) of a one-row tile of fv vectors that fits
    the registers."""
    return max(c for c in _widths(wl, divides) if _fits(registers, fv, c))


def sample_tiles(sch: s_tir.Schedule, wl: ConvWorkload, core: CpuCore, knobs: Knobs) -> Knobs:
    """`knobs` with ow_tile, oh_tile and rc_tile replaced by decisions sampled in `sch`: register tiles
    that fit (with one output row; taller tiles may spill, the tuner measures it), and input-channel
    steps that divide the group's channels. A flat tile keeps its pixels (the compute is padded to
    them) and has no rows."""
    def sample(candidates):
        return sch.sample_categorical(candidates, [1 / len(candidates)] * len(candidates))
    divides = _chunk_tiles(wl, knobs.winograd, knobs.chunk_rows)
    if knobs.winograd:  # the tiles of its product, as those of the 1x1 convolution with its loops
        wl = wl.winograd_gemm(knobs.winograd)
    cg = wl.group_in_channels
    steps = sorted({cg} | {c for c in (4, 8, 16, 32, 64, 128) if c < cg and cg % c == 0})
    if knobs.flat:
        return dataclasses.replace(knobs, rc_tile=sample(steps))
    widths = [c for c in _widths(wl, divides) if _fits(core.registers, knobs.f_vectors, c)]
    heights = [c for c in (1, 2, 4) if c <= wl.out_height]
    return dataclasses.replace(knobs, ow_tile=sample(widths), oh_tile=sample(heights), rc_tile=sample(steps))


def apply(sch: s_tir.Schedule, wl: ConvWorkload, knobs: Knobs) -> None:
    """Schedule the compute in `sch` with `knobs`; the tile sizes may be sampled decisions. Every
    instruction's outputs are the same for any tile sizes, as MetaSchedule's trace replay requires (so
    no `get_loops(...)[-1]` on loops that vanish when a tile is 1: LLVM vectorizes those by itself).
    `sch` holds workload.prim_func(knobs.weight_block, knobs.flat_tile)."""
    # Chunked Winograd: every stage is computed under the loop over chunks, which runs in parallel.
    chunk = _winograd_chunks(sch, wl, knobs) if knobs.chunk_rows else None
    conv = sch.get_sblock("conv")
    if knobs.flat:
        p, f, rh, rw, rc = sch.get_loops(conv)
        p_o, p_i = sch.split(p, factors=[None, knobs.ow_tile])
        rows, columns, unrolled = (p_o,), (), (p_i,)
    else:
        n, oh, ow, f, rh, rw, rc = sch.get_loops(conv)[-7:]
        oh_o, oh_i = sch.split(oh, factors=[None, knobs.oh_tile])
        ow_o, ow_i = sch.split(ow, factors=[None, knobs.ow_tile])
        rows, columns, unrolled = (n, oh_o), (ow_o,), (oh_i, ow_i)
    f_o, f_r, f_v = sch.split(f, factors=[None, knobs.f_vectors, knobs.lanes])
    rc_step = wl.group_in_channels if isinstance(knobs.rc_tile, int) and knobs.rc_tile == 0 else knobs.rc_tile
    rc_o, rc_i = sch.split(rc, factors=[None, rc_step])
    if knobs.order == "rows":
        outer, tiles = (*rows, f_o), columns
    elif knobs.order == "filters":
        outer, tiles = (f_o, *rows), columns
    else:  # "pixels"
        outer, tiles = rows, (*columns, f_o)
    sch.reorder(*outer, *tiles, rc_o, rh, rw, rc_i, *unrolled, f_r, f_v)
    if chunk is None:
        # Threads split rows and filter blocks together, unless the order puts filter blocks inside: 7x7 layers
        # have too few rows for many cores.
        outer = (sch.fuse(*outer),)
        sch.parallel(outer[0])
    # The innermost loop over tiles, under which each tile's accumulators are written out.
    tile = tiles[-1] if tiles else outer[-1]
    if knobs.flat or knobs.winograd:
        # The accumulator tile lives in registers and is written to the conv stage, which the epilogue
        # then reads in a pass of its own: a flat tile's pixels need not form a rectangle of the output,
        # and Winograd's output transform reads every point of the transform.
        write_back = sch.cache_write(conv, 0, "local")
        # Its loops under the tile's: pixels, filters, each gone where the tile's extent is 1 (a flat tile's
        # extents are no sampled decisions); Winograd's sampled tile keeps them all (point, row, tiles, filters).
        sch.reverse_compute_at(write_back, tile, preserve_unit_loops=bool(knobs.winograd))
        copy_loops = sch.get_loops(write_back)[(chunk is not None) + len(outer) + len(tiles):]
        if knobs.winograd or min(knobs.weight_block, wl.filters) > 1:
            *copy_loops, filters = copy_loops
            sch.vectorize(filters)
        for loop in copy_loops:
            sch.unroll(loop)
        if chunk is None:
            if knobs.winograd:
                _schedule_winograd_transforms(sch, wl, knobs, parallel=True)
            epilogue = sch.get_loops(sch.get_sblock("epilogue"))
            sch.parallel(sch.fuse(*epilogue[:2]))
            _vectorize_output(sch, epilogue[-1], knobs)
    else:
        # The accumulator tile lives in registers; the epilogue consumes it inside the same tile.
        sch.set_scope(conv, 0, "local")
        # (With a last-axis activation, "epilogue" is the pre-activation tensor; the stages after it
        # need whole rows and stay outside.)
        sch.reverse_compute_at(sch.get_sblock("epilogue"), tile)
        if knobs.stream_output and min(knobs.weight_block, wl.filters) > 1:
            # Else LLVM vectorizes the epilogue's filters by itself, but non-temporal stores need vectors in TIR.
            _vectorize_output(sch, sch.get_loops(sch.get_sblock("epilogue"))[-1], knobs)
    if knobs.unroll_window:
        sch.unroll(rh)
        sch.unroll(rw)
    for loop in unrolled:
        sch.unroll(loop)
    sch.unroll(f_r)
    sch.vectorize(f_v)
    sch.decompose_reduction(conv, rc_o)
    if knobs.winograd or not wl.has_data_pad:  # Winograd's input transform reads the padding as zeros
        return
    pad = sch.get_sblock("data_pad")
    if knobs.pad_inline:
        sch.compute_inline(pad)
    else:
        loops = sch.get_loops(pad)
        sch.parallel(sch.fuse(*loops[:2]))
        sch.vectorize(loops[-1])


def _vectorize_output(sch: s_tir.Schedule, loop, knobs: Knobs) -> None:
    """Vectorize the epilogue's innermost loop, over the output's last axis, marked for non-temporal stores
    where the knobs stream the output."""
    sch.vectorize(loop)
    if knobs.stream_output:
        sch.annotate(loop, NONTEMPORAL_PRAGMA, 1)


def _winograd_chunks(sch: s_tir.Schedule, wl: ConvWorkload, knobs: Knobs):
    """Winograd in chunks of `knobs.chunk_rows` rows of tiles: each chunk's input transform, product, output
    transform and epilogue run one after the other on one thread, so the transformed tiles (alpha^2 x channels
    each, in and out) stay in its core's cache, where stages over all tiles hand them on through L3 or memory
    (ResNet-50's 3x3 layers of width 56 at batch 8 on Zen 4: 29 MB a call). The epilogue's rows lead, split
    by the chunk's rows of pixels and in parallel with the images, and the stages before it are computed at
    that loop: TVM infers their tiles from the epilogue's rows, where the reverse (the epilogue's pixels from
    the tiles) it cannot. The product's register tiles are then `apply`'s; returns the loop over chunks."""
    rows = wl.winograd_tiles(knobs.winograd)[0]
    if rows % knobs.chunk_rows:  # a chunk past an image's last row would read the next image's rows
        raise ValueError(f"Knobs.chunk_rows must divide the {rows} rows of F({knobs.winograd}, 3)'s tiles of "
                         f"{wl.label}; got {knobs.chunk_rows}")
    loops = sch.get_loops(sch.get_sblock("epilogue"))
    n, oh, innermost = loops[0], loops[1 if wl.channels_last else 2], loops[-1]
    oh_o, oh_i = sch.split(oh, factors=[None, knobs.chunk_rows * knobs.winograd])
    if not wl.channels_last:  # (n, filters, rows, columns): the chunk's rows outside its filters
        sch.reorder(oh_o, loops[1], oh_i)
    chunk = sch.fuse(n, oh_o)
    sch.parallel(chunk)
    sch.vectorize(innermost)
    for stage in ("winograd_output", "conv", "winograd_input"):
        sch.compute_at(sch.get_sblock(stage), chunk, preserve_unit_loops=True)
    _schedule_winograd_transforms(sch, wl, knobs, parallel=False)
    return chunk


def _schedule_winograd_transforms(sch: s_tir.Schedule, wl: ConvWorkload, knobs: Knobs, parallel: bool) -> None:
    """Winograd's input transform and the first half of its output transform (compute.conv2d_forward): tiles
    (in parallel, or in a chunk's thread), channels in vectors, the points of the transform unrolled, each
    tile's rows computed where its columns read them."""
    eps, nu, p, c = sch.get_loops(sch.get_sblock("winograd_input"))[-4:]
    channels = _tile_by_vectors(sch, p, c, (eps, nu), math.gcd(wl.in_channels, knobs.lanes), parallel)
    rows = sch.get_sblock("winograd_rows")
    sch.compute_at(rows, channels)
    i, nu, c = sch.get_loops(rows)[-3:]
    sch.unroll(i)
    sch.unroll(nu)
    sch.vectorize(c)
    p, i, jj, f = sch.get_loops(sch.get_sblock("winograd_output"))[-4:]
    _tile_by_vectors(sch, p, f, (i, jj), math.gcd(wl.filters, knobs.lanes), parallel)


def _tile_by_vectors(sch: s_tir.Schedule, tile, channels, points, lanes: int, parallel: bool):
    """A transform's loops as tiles (in parallel if `parallel`), then channel vectors, then its points unrolled,
    each a vector of `lanes` channels; returns the loop over vectors."""
    outer, inner = sch.split(channels, factors=[None, lanes])
    sch.reorder(tile, outer, *points, inner)
    if parallel:
        sch.parallel(tile)
    for point in points:
        sch.unroll(point)
    sch.vectorize(inner)
    return outer


def schedule_depthwise_weight_gradient(sch: s_tir.Schedule, wl: ConvWorkload, core: CpuCore) -> None:
    """backward.depthwise_weight_gradient: each vector of filters (in parallel) keeps its kh·kw taps' sums
    in registers over the whole reduction, so every dz vector loaded feeds kh·kw FMAs. (Loop transforms
    come before decompose_reduction: they need the block whole.)"""
    block = sch.get_sblock("dW")
    accumulators = sch.cache_write(block, 0, "local")
    i, j, _, f, n, oh, ow = sch.get_loops(block)
    f_outer, f_inner = sch.split(f, [None, math.gcd(wl.filters, lanes(wl, core))])
    sch.reorder(f_outer, n, oh, ow, i, j, f_inner)
    sch.reverse_compute_at(accumulators, f_outer)
    sch.unroll(i)
    sch.unroll(j)
    sch.vectorize(f_inner)
    sch.vectorize(sch.get_loops(accumulators)[-1])
    sch.parallel(f_outer)
    sch.decompose_reduction(block, n)


def schedule_pointwise_weight_gradient(sch: s_tir.Schedule, wl: ConvWorkload, core: CpuCore) -> None:
    """backward.pointwise_weight_gradient, dW = xᵀ·dz over the pixels: a tile of up to 6 input channels x
    2-4 vectors of filters kept in registers over the whole reduction, each pixel's x values broadcast
    and its dz row loaded as vectors. The tiles run in parallel, filters outer, so that the tiles of a
    core share their slice of dz in cache."""
    block = sch.get_sblock("dW")
    accumulators = sch.cache_write(block, 0, "local")
    i, j, c, f, n, oh, ow = sch.get_loops(block)
    n_lanes = lanes(wl, core)
    vectors = next(v for v in ((4, 2, 1) if core.vector_bits >= 512 else (2, 1)) if wl.filters % (v * n_lanes) == 0)
    rows = max(r for r in range(1, 7) if wl.in_channels % r == 0)
    f_outer, f_vector, f_lane = sch.split(f, [None, vectors, n_lanes])
    c_outer, c_inner = sch.split(c, [None, rows])
    sch.reorder(f_outer, c_outer, i, j, n, oh, ow, c_inner, f_vector, f_lane)
    sch.reverse_compute_at(accumulators, c_outer)
    sch.unroll(c_inner)
    sch.unroll(f_vector)
    sch.vectorize(f_lane)
    sch.vectorize(sch.get_loops(accumulators)[-1])
    sch.parallel(sch.fuse(f_outer, c_outer))
    sch.decompose_reduction(block, n)


def schedule_weight_gradient_image(sch: s_tir.Schedule, wl: ConvWorkload, core: CpuCore) -> None:
    """backward.weight_gradient_image, a regrouping copy: rows in parallel, and per pixel the channels
    and samples in the order x holds them, so x is read along its rows. Scalar: vectors over the
    output's (channel, sample) axes gather or scatter (ResNet-50's 56x56x64: 0.06 ms at batch 1 and
    0.40 at batch 8, against 1.18 and 0.80 for the vectorized elementwise schedule)."""
    block = sch.get_sblock("image")
    c, h, w, k = sch.get_loops(block)
    sch.reorder(h, w, c, k)
    sch.parallel(h)


def schedule_elementwise(sch: s_tir.Schedule, wl: ConvWorkload, core: CpuCore) -> None:
    """Elementwise computes such as the activation's derivative (tvmconv.backward): each block's loops
    fused, split into vectors, and the rest run in parallel. Blocks with a reduction (the last-axis
    activations) run their two outer data-parallel loops in parallel."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        iter_vars = sch.get(block).iter_vars
        loops = sch.get_loops(block)
        if all(iv.iter_type == 0 for iv in iter_vars):  # 0: data-parallel
            bits = DataType(str(sch.get(block).writes[0].source.dtype)).bits
            total = math.prod(int(sch.get(loop).extent) for loop in loops)
            n_lanes = math.gcd(total, max(core.vector_bits // bits, 1))  # no tail for the vector loop
            outer, inner = sch.split(sch.fuse(*loops), [None, n_lanes])
            sch.parallel(outer)
            sch.vectorize(inner)
        else:
            outer = loops[:min(2, sum(1 for iv in iter_vars if iv.iter_type == 0))]
            sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


# ---------------------------------------------------------------- the rule


class CpuRule:
    """The schedule rule of a family of LLVM CPUs (see schedules/__init__.py for the contract): the template
    above for convolutions, the fixed schedules above for the gradient kernels. `architectures` are the
    LLVM triple's first parts it accepts (None: any LLVM target); `core` models a target's core."""

    def __init__(self, name: str, architectures: tuple[str, ...] | None, core: Callable[[object], CpuCore]):
        self.name, self.architectures, self.core = name, architectures, core

    def __repr__(self):
        return f"<CpuRule {self.name}>"

    def applies(self, target) -> bool:
        return target.kind.name == "llvm" and (self.architectures is None
                                                or architecture(target) in self.architectures)

    def default_knobs(self, workload, target) -> Knobs | None:
        return default_knobs(workload, self.core(target)) if isinstance(workload, ConvWorkload) else None

    def tunable_knobs(self, workload, target) -> list[Knobs]:
        return tunable_knobs(workload, self.core(target)) if isinstance(workload, ConvWorkload) else []

    def sample_tiles(self, sch: s_tir.Schedule, workload: ConvWorkload, target, knobs: Knobs) -> Knobs:
        return sample_tiles(sch, workload, self.core(target), knobs)

    @functools.singledispatchmethod
    def schedule(self, workload, sch: s_tir.Schedule, target, knobs) -> None:
        raise NotImplementedError(f"the {self.name} rule has no schedule for {type(workload).__name__}")

    @schedule.register
    def _(self, workload: ConvWorkload, sch: s_tir.Schedule, target, knobs: Knobs) -> None:
        if knobs.stream_output and not self.core(target).nontemporal_stores:
            raise ValueError(f"Knobs.stream_output needs non-temporal stores, which the {self.name} rule's cores do not "
                             f"have (x86's do); got stream_output=True for {target.attrs.get('mcpu', target.kind.name)}")
        apply(sch, workload, knobs)

    @schedule.register
    def _(self, workload: backward.ActivationGradient, sch: s_tir.Schedule, target, knobs=None) -> None:
        schedule_elementwise(sch, workload.workload, self.core(target))

    @schedule.register
    def _(self, workload: backward.DepthwiseWeightGradient, sch: s_tir.Schedule, target, knobs=None) -> None:
        schedule_depthwise_weight_gradient(sch, workload.workload, self.core(target))

    @schedule.register
    def _(self, workload: backward.PointwiseWeightGradient, sch: s_tir.Schedule, target, knobs=None) -> None:
        schedule_pointwise_weight_gradient(sch, workload.workload, self.core(target))

    @schedule.register
    def _(self, workload: backward.WeightGradientImage, sch: s_tir.Schedule, target, knobs=None) -> None:
        schedule_weight_gradient_image(sch, workload.workload, self.core(target))


def generic_core(target) -> CpuCore:
    """Any LLVM CPU no family module knows: its vector width, and 16 vector registers assumed."""
    return CpuCore(vector_bits(target), 16, cores=target_cores(target))


GENERIC = CpuRule("cpu", None, generic_core)
