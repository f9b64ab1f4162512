"""The CPU template at its default and edge knobs against the float64 reference; the x86 builds' code."""
import dataclasses
import os
import re

import numpy as np
import pytest
import tvm
from kernel_check import HOST
from kernel_check import check_kernel as _check
from paths import PATHS

import tvmconv
from tvmconv import build, lowering, records, targets, tuning
from tvmconv.compute import ConvWorkload, pack_weights, winograd_matrices
from tvmconv.schedules import cpu, find_rule, x86

WORKLOADS = {
    "3x3 same": ConvWorkload(1, 9, 10, 8, 24, (3, 3), padding="same"),
    "3x3 stride 2": ConvWorkload(2, 11, 9, 6, 16, (3, 3), (2, 2), padding="same"),
    "1x1": ConvWorkload(1, 7, 7, 32, 40, (1, 1)),
    "1x1 stride 2": ConvWorkload(1, 9, 9, 16, 32, (1, 1), (2, 2)),
    "first layer 7x7 s2": ConvWorkload(1, 17, 15, 3, 16, (7, 7), (2, 2), padding="same"),
    "depthwise": ConvWorkload(1, 10, 10, 24, 24, (3, 3), padding="same", groups=24),
    "depthwise s2": ConvWorkload(1, 10, 10, 24, 24, (3, 3), (2, 2), padding="same", groups=24),
    "grouped": ConvWorkload(1, 8, 8, 32, 64, (3, 3), padding="same", groups=8),
    "dilated": ConvWorkload(1, 12, 12, 4, 8, (3, 3), dilation=(2, 2), padding="same"),
    "channels_first": ConvWorkload(1, 9, 9, 8, 24, (3, 3), padding="same", data_format="channels_first"),
    "relu, no bias": ConvWorkload(1, 6, 6, 4, 8, (3, 3), use_bias=False, activation="relu"),
    "float64": ConvWorkload(1, 6, 7, 3, 8, (3, 3), padding="same", dtype="float64"),
}


@pytest.mark.parametrize("name", WORKLOADS)
def test_default_knobs(name):
    wl = WORKLOADS[name]
    _check(wl, find_rule(HOST).default_knobs(wl, HOST))


EDGE_KNOBS = [
    cpu.Knobs(lanes=4, f_vectors=1, ow_tile=1),                       # tile = 1 everywhere
    cpu.Knobs(lanes=8, f_vectors=3, ow_tile=9, oh_tile=9),            # tiles as large as (or past) the extent
    cpu.Knobs(lanes=16, f_vectors=2, ow_tile=4, oh_tile=2, rc_tile=3),  # non-dividing tiles, all axes
    cpu.Knobs(lanes=8, f_vectors=1, ow_tile=5, order="filters", pad_inline=True),
    cpu.Knobs(lanes=8, f_vectors=2, ow_tile=3, oh_tile=2, order="pixels", pad_inline=True, unroll_window=True),
    cpu.Knobs(lanes=1, f_vectors=5, ow_tile=3, rc_tile=1),            # scalar lanes
    # Flat tiles over all samples' pixels: a tile that crosses rows and samples, and one past the last pixel.
    cpu.Knobs(lanes=8, f_vectors=2, ow_tile=5, flat=True),
    cpu.Knobs(lanes=4, f_vectors=1, ow_tile=7, rc_tile=3, flat=True, order="filters", pad_inline=True),
    cpu.Knobs(lanes=8, f_vectors=2, ow_tile=5, flat=True, order="pixels"),
    cpu.Knobs(lanes=1, f_vectors=3, ow_tile=16, flat=True, unroll_window=True),
    cpu.Knobs(lanes=1, f_vectors=1, ow_tile=3, flat=True),  # a tile of one filter
    cpu.Knobs(lanes=8, f_vectors=1, ow_tile=1, flat=True),  # a tile of one pixel
]


@pytest.mark.parametrize("fields, name", [(dict(ow_tile=0, flat=True), "ow_tile"), (dict(ow_tile=-3), "ow_tile"),
                                          (dict(f_vectors=0), "f_vectors"), (dict(rc_tile=-1), "rc_tile"),
                                          (dict(oh_tile=True), "oh_tile")])
def test_unusable_tile_sizes_are_refused_naming_the_knob(fields, name):
    with pytest.raises(ValueError, match=rf"Knobs\.{name} must be an int of at least"):
        cpu.Knobs(**{"lanes": 8, "f_vectors": 2, "ow_tile": 5, **fields})


def test_an_unknown_loop_order_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"Knobs\.order must be one of 'rows', 'filters', 'pixels', got 'columns'"):
        cpu.Knobs(lanes=8, f_vectors=2, ow_tile=5, order="columns")


@pytest.mark.parametrize("knobs", EDGE_KNOBS, ids=repr)
@pytest.mark.parametrize("name", ["3x3 same", "3x3 stride 2", "depthwise s2", "grouped", "channels_first",
                                  "first layer 7x7 s2"])
def test_edge_knobs(name, knobs):
    _check(WORKLOADS[name], knobs)


@pytest.mark.parametrize("preset, register, absent", [("x86-avx2", "ymm", "zmm"), ("x86-avx512", "zmm", None)])
@pytest.mark.parametrize("name", PATHS)
def test_x86_builds_use_vector_fmas(preset, register, absent, name):
    """Whichever CPU runs this, both x86 paths compile, and the FMAs are on full-width registers."""
    target = targets.resolve(preset)
    wl = PATHS[name]
    rule = find_rule(target)
    assert rule is x86.RULE
    func = build.scheduled(wl, target, rule, rule.default_knobs(wl, target))
    asm = lowering.compile(func, target).inspect_source("asm")
    fmas = re.findall(rf"vfmadd\d+ps\s+[^\n]*%{register}", asm)
    assert len(fmas) >= 4, f"no {register} FMAs in the {preset} build"
    if absent:
        assert f"%{absent}" not in asm


@pytest.mark.skipif(not os.path.isdir("/sys/devices/system/cpu/cpu0/cache/index0"), reason="no cache sizes in /sys")
def test_the_host_core_has_the_caches_linux_reports():
    """Read from each cache/index<N> folder (cache/ also holds files: uevent, which once made it read nothing)."""
    root, sizes = "/sys/devices/system/cpu/cpu0/cache", {}
    for index in (name for name in os.listdir(root) if name.startswith("index")):
        level, kind, size = (open(os.path.join(root, index, field)).read().strip() for field in ("level", "type", "size"))
        if (level, kind) in (("1", "Data"), ("2", "Unified"), ("3", "Unified")):
            sizes[f"l{level}_bytes"] = int(size[:-1]) * {"K": 1024, "M": 1 << 20}[size[-1]]
    assert x86.host_caches() == sizes and sizes
    host = targets.resolve(None)
    if targets.architecture(host) == "x86_64":
        core = x86.core(host)
        assert {name: getattr(core, name) for name in sizes} == sizes


def test_x86_defaults_fit_the_register_file():
    wl = ConvWorkload(1, 56, 56, 64, 64, (3, 3), padding="same")
    for preset, registers, lanes in (("x86-avx2", 16, 8), ("x86-avx512", 32, 16)):
        knobs = x86.RULE.default_knobs(wl, targets.resolve(preset))
        assert knobs.lanes == lanes
        accumulators = knobs.ow_tile * knobs.oh_tile * knobs.f_vectors
        assert 8 <= accumulators and accumulators + knobs.f_vectors + 1 <= registers


@pytest.mark.parametrize("preset", ["x86-avx2", "x86-avx512"])
def test_x86_defaults_on_7x7_layers_leave_no_width_tail(preset):
    """Width 7 leaves tiles of up to 6 columns a tail. The defaults tile the flat pixel axis there (AVX2: at
    least 10 accumulators, where 7 columns of one vector hold 7), unless 7 columns reach the accumulators
    the core needs (AVX-512: 7 x 2 vectors). Widths of two tiles or more keep rectangles."""
    target = targets.resolve(preset)
    registers = 32 if preset == "x86-avx512" else 16
    # (A 3x3 stride-1 layer computes by Winograd where its input is channels-last: test_winograd_defaults.)
    for wl in (ConvWorkload(1, 7, 7, 512, 512, (3, 3), padding="same", data_format="channels_first"),
               ConvWorkload(8, 7, 7, 2048, 512, (1, 1)),
               ConvWorkload(1, 14, 14, 1024, 2048, (1, 1), (2, 2))):
        knobs = x86.RULE.default_knobs(wl, target)
        if preset == "x86-avx2":
            assert knobs.flat and knobs.flat_tile == knobs.ow_tile and knobs.ow_tile * knobs.f_vectors >= 10, knobs
        else:
            assert knobs.flat or wl.out_width % knobs.ow_tile == 0, (wl.label, knobs)
        assert knobs.ow_tile * knobs.f_vectors + knobs.f_vectors + 3 <= registers
    assert not x86.RULE.default_knobs(ConvWorkload(1, 56, 56, 64, 64, (3, 3), padding="same"), target).flat


@pytest.mark.parametrize("preset", ["x86-avx2", "x86-avx512"])
def test_winograd_defaults(preset):
    """F(4, 3) for float32 channels-last 3x3 stride-1 layers of 16 channels and filters or more, its product
    tiled as the 1x1 convolution with its loops; F(2, 3) where F(4, 3)'s transformed weights (38 MB) would
    stream from memory for 4 tiles (batch 1, 7x7) or its tiles would mostly overhang the output (5x5: 25 of
    64 pixels used, F(2, 3) 25 of 36); the direct sum elsewhere. Tuning searches the chosen one and the
    direct sum."""
    target = targets.resolve(preset)
    for wl, m in ((ConvWorkload(1, 56, 56, 64, 64, (3, 3), padding="same"), 4),
                  (ConvWorkload(8, 7, 7, 512, 512, (3, 3), padding="same"), 4),
                  (ConvWorkload(1, 14, 14, 16, 32, (3, 3), padding="same", use_bias=False, activation="relu"), 4),
                  (ConvWorkload(1, 7, 7, 512, 512, (3, 3), padding="same"), 2),
                  (ConvWorkload(8, 7, 7, 512, 512, (3, 3)), 2)):
        knobs = x86.RULE.default_knobs(wl, target)
        gemm = wl.winograd_gemm(m)
        tiles = -(-wl.out_height // m)
        assert (gemm.batch, gemm.out_height, gemm.out_width) == ((m + 2) ** 2, 1, wl.batch * tiles ** 2)
        assert knobs.winograd == m and not knobs.flat and knobs.oh_tile == 1 and knobs.rc_tile == 4
        assert knobs.ow_tile <= gemm.out_width, knobs
        variants = x86.RULE.tunable_knobs(wl, target)
        assert {k.winograd for k in variants} == {0, m} and {k.layout for k in variants} > {(knobs.weight_block, 0, m)}
    for wl in (ConvWorkload(1, 56, 56, 64, 64, (3, 3), (2, 2), padding="same"),
               ConvWorkload(1, 56, 56, 64, 64, (3, 3), dilation=(2, 2), padding="same"),
               ConvWorkload(1, 56, 56, 64, 64, (3, 3), padding="same", groups=2),
               ConvWorkload(1, 56, 56, 64, 64, (3, 3), padding="same", data_format="channels_first"),
               ConvWorkload(1, 56, 56, 64, 64, (3, 3), padding="same", dtype="float16"),
               ConvWorkload(1, 56, 56, 8, 64, (3, 3), padding="same"), ConvWorkload(1, 56, 56, 64, 64, (5, 5))):
        assert x86.RULE.default_knobs(wl, target).winograd == 0, wl.label
        assert {k.winograd for k in x86.RULE.tunable_knobs(wl, target)} == {0}


def test_loop_orders_and_inline_padding_of_the_defaults():
    """Depthwise layers, flat tiles and outputs over twice L2 run pixels first (each pixel's channels in one
    stream); depthwise tiles span 2 columns at stride 2, 4 at stride 1, or 7 where 4 do not divide the width;
    padding only after the input is read through bound checks, padding on all sides is copied, and so is
    padding after the input for tiles of several rows and more than 8 accumulators. Tuning searches every
    order."""
    target = targets.resolve("x86-avx2")
    depthwise = x86.RULE.default_knobs(ConvWorkload(8, 112, 112, 32, 32, (3, 3), padding="same", groups=32), target)
    assert (depthwise.order, depthwise.ow_tile, depthwise.pad_inline) == ("pixels", 4, True)
    strided = x86.RULE.default_knobs(ConvWorkload(1, 112, 112, 96, 96, (3, 3), (2, 2), padding="same", groups=96),
                                     target)
    assert (strided.order, strided.ow_tile) == ("pixels", 2)
    # Where no tile of 4 columns divides the width: 7 columns of one vector.
    for width in (7, 14):
        narrow = x86.RULE.default_knobs(ConvWorkload(1, width, width, 576, 576, (3, 3), padding="same", groups=576),
                                        target)
        assert (narrow.ow_tile, narrow.f_vectors) == (7, 1), narrow
    flat = x86.RULE.default_knobs(ConvWorkload(1, 7, 7, 960, 320, (1, 1)), target)
    assert flat.flat and flat.order == "pixels"
    # With a 3x3 window, filter blocks first once the input outgrows L2 (batch 8).
    for batch, order in ((1, "pixels"), (8, "filters")):
        windowed = x86.RULE.default_knobs(ConvWorkload(batch, 7, 7, 512, 512, (3, 3), padding="same",
                                                       data_format="channels_first"), target)
        assert windowed.flat and windowed.order == order, (batch, windowed)
    trailing = ConvWorkload(1, 28, 28, 256, 256, (3, 3), (2, 2), padding="same")
    knobs = x86.RULE.default_knobs(trailing, target)
    assert trailing.pads == (0, 0, 1, 1) and knobs.pad_inline and knobs.ow_tile * knobs.oh_tile * knobs.f_vectors <= 8
    # Tiles of several rows and more accumulators copy: LLVM may leave their checks in the reduction loop. The
    # copy's pass counts against them: with AVX-512, where a tile of one row scores as well, that one reads in place.
    strided = ConvWorkload(8, 56, 56, 128, 128, (3, 3), (2, 2), padding="same")
    knobs = x86.RULE.default_knobs(strided, target)
    assert knobs.oh_tile > 1 and knobs.ow_tile * knobs.oh_tile * knobs.f_vectors > 8 and not knobs.pad_inline
    knobs = x86.RULE.default_knobs(strided, targets.resolve("x86-avx512"))
    assert knobs.oh_tile == 1 and knobs.pad_inline, knobs
    all_sides = ConvWorkload(1, 56, 56, 64, 64, (3, 3), (1, 1), (2, 2), padding="same")  # dilated: no Winograd
    knobs = x86.RULE.default_knobs(all_sides, target)
    assert not knobs.pad_inline and not knobs.flat
    # Several filter blocks: pixels first once the output is over twice L2 and the weights fit there.
    assert x86.RULE.default_knobs(ConvWorkload(1, 14, 14, 64, 128, (1, 1)), target).order == "rows"
    assert x86.RULE.default_knobs(ConvWorkload(8, 56, 56, 64, 256, (1, 1)), target).order == "pixels"
    assert x86.RULE.default_knobs(ConvWorkload(8, 14, 14, 256, 256, (3, 3), padding="same",
                                               data_format="channels_first"), target).order != "pixels"
    assert {k.order for k in x86.RULE.tunable_knobs(all_sides, target)} == set(cpu.ORDERS)


def test_weights_stay_in_a_quarter_of_intels_server_l2():
    """Rows first reads all the weights again for every row of tiles; Intel's server L2 keeps them only up to a
    quarter of its size (x86's table), Zen's up to the whole of it. So ResNet-50's 1x1 layers with 1-2 MiB of
    weights run filter blocks first on Sapphire Rapids (2 MiB of L2) and rows first on Zen 4 (1 MiB), at batch
    1 and 8 (the stride-2 one counting only the input its windows read: every other row and column).
    Winograd's product reads each point's weights once in any order: its order is not affected."""
    sapphire_rapids, zen4 = (targets.resolve({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
                             for mcpu in ("sapphirerapids", "znver4"))
    assert x86.RULE.core(sapphire_rapids).weights_l2_bytes == x86.RULE.core(sapphire_rapids).l2_bytes // 4
    assert x86.RULE.core(zen4).weights_l2_bytes == x86.RULE.core(zen4).l2_bytes
    for wl in (ConvWorkload(1, 14, 14, 1024, 512, (1, 1)), ConvWorkload(8, 28, 28, 512, 1024, (1, 1), (2, 2))):
        assert x86.RULE.default_knobs(wl, sapphire_rapids).order == "filters", wl.label
        assert x86.RULE.default_knobs(wl, zen4).order == "rows", wl.label
    winograd = x86.RULE.default_knobs(ConvWorkload(1, 7, 7, 512, 512, (3, 3), padding="same"), sapphire_rapids)
    assert winograd.winograd and winograd.order == "rows"


def test_weight_heavy_tiles_follow_what_l2_delivers():
    """Where a filter block's weights outgrow L1, each step of a tile loads its weight vectors from L2. Intel's
    server L2 sustains 24 bytes a cycle (x86's table): a tile of 4 vectors of 64 bytes that two FMA ports finish
    in 8 cycles needs 32, so the model takes 2 vectors and more pixels there; Zen 4's one 512-bit FMA a cycle
    takes 16 cycles for the same tile, which its L2 feeds. Weights that stay in L1 keep 4 vectors."""
    sapphire_rapids, zen4 = (targets.resolve({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
                             for mcpu in ("sapphirerapids", "znver4"))
    for wl in (ConvWorkload(1, 14, 14, 256, 1024, (1, 1)), ConvWorkload(8, 28, 28, 512, 256, (1, 1))):
        assert x86.RULE.default_knobs(wl, sapphire_rapids).f_vectors == 2, wl.label
        assert x86.RULE.default_knobs(wl, zen4).f_vectors == 4, wl.label
    assert x86.RULE.default_knobs(ConvWorkload(1, 56, 56, 64, 256, (1, 1)), sapphire_rapids).f_vectors == 4


def test_one_by_one_kernels_reduce_four_channels_a_step():
    """A 1x1 kernel, and Winograd's product, reduce 4 input channels a step (an unrolled loop), where 4 divide
    a group's channels; a window's taps sit inside each step, so other kernels take all channels in one. The
    kernels compute the convolution (float64 reference)."""
    target = targets.resolve("x86-avx512")
    cases = {ConvWorkload(8, 28, 28, 512, 256, (1, 1)): 4, ConvWorkload(1, 14, 14, 24, 32, (1, 1), (2, 2)): 4,
             ConvWorkload(1, 7, 7, 4, 32, (1, 1)): 4, ConvWorkload(1, 7, 7, 6, 32, (1, 1)): 6,
             ConvWorkload(1, 14, 14, 64, 64, (1, 1), groups=4): 4,
             ConvWorkload(1, 14, 14, 24, 48, (1, 1), groups=4): 6,
             ConvWorkload(1, 56, 56, 64, 64, (3, 3), padding="same"): 4,  # Winograd
             ConvWorkload(1, 28, 28, 256, 256, (3, 3), (2, 2), padding="same"): 256,
             ConvWorkload(1, 14, 14, 96, 96, (3, 3), padding="same", groups=96): 1}
    for wl, step in cases.items():
        assert x86.RULE.default_knobs(wl, target).rc_tile == step, wl.label
    for wl in (ConvWorkload(1, 7, 9, 12, 32, (1, 1), padding="same"), ConvWorkload(2, 6, 6, 24, 16, (1, 1), groups=2)):
        knobs = find_rule(HOST).default_knobs(wl, HOST)
        assert knobs.rc_tile == 4 < wl.group_in_channels, knobs
        _check(wl, knobs)


def test_flat_tiles_are_tuned_in_tasks_of_their_own():
    """Where flat tiles apply (widths under 8, not depthwise), the tuner's space holds them besides the rectangles,
    one number of pixels per vector count, each layout (weight block, flat tile) a task of its own. A program
    sampled from a flat design space replays from its trace as a record does, and computes the convolution."""
    wl = ConvWorkload(1, 7, 7, 8, 32, (3, 3), padding="same")
    rule = find_rule(HOST)
    variants = rule.tunable_knobs(wl, HOST)
    flat = [k for k in variants if k.flat]
    assert flat and any(not k.flat for k in variants) and {k.order for k in flat} == set(cpu.ORDERS)
    assert len({(k.f_vectors, k.ow_tile) for k in flat}) == len({k.f_vectors for k in flat})
    for other in (ConvWorkload(1, 8, 8, 8, 32, (3, 3), padding="same"), ConvWorkload(1, 7, 7, 8, 8, (3, 3), groups=8)):
        assert not any(k.flat for k in rule.tunable_knobs(other, HOST)), other.label
    contexts = tuning.tasks(wl, HOST, "template")
    layouts = [records.workload_of(context.mod["main"])[1] for context in contexts]
    assert sorted(layouts) == sorted({k.layout for k in variants})
    checked = 0
    for context, layout in zip(contexts, layouts, strict=True):
        if layout[1]:
            spaces = context.generate_design_space()
            assert len(spaces) == sum(k.layout == layout for k in variants)
            # One per task, the orders in turn: each build takes seconds.
            space = spaces[checked % len(spaces)]
            _check(wl, None, record=records.Tuned("sampled", *layout, space.trace, 1.0, 1, None))
            checked += 1
    assert checked == len({k.f_vectors for k in flat})


WINOGRAD_WORKLOADS = {
    "same, tiles past the edge": ConvWorkload(1, 9, 10, 24, 32, (3, 3), padding="same"),
    "valid, batch 2": ConvWorkload(2, 8, 7, 16, 16, (3, 3), padding="valid", activation="relu"),
    "channels not a vector's multiple": ConvWorkload(1, 6, 6, 20, 12, (3, 3), padding="same", activation="elu"),
    "softmax over the filters": ConvWorkload(1, 5, 5, 16, 24, (3, 3), padding="same", activation="softmax"),
    "channels_first": ConvWorkload(1, 7, 6, 16, 16, (3, 3), padding="same", data_format="channels_first"),
    "float64": ConvWorkload(1, 6, 7, 8, 8, (3, 3), padding="same", dtype="float64", use_bias=False),
}
WINOGRAD_KNOBS = [
    cpu.Knobs(lanes=8, f_vectors=2, ow_tile=4, winograd=4),
    cpu.Knobs(lanes=4, f_vectors=3, ow_tile=5, rc_tile=3, order="filters", winograd=4),  # non-dividing tiles
    cpu.Knobs(lanes=8, f_vectors=1, ow_tile=3, order="pixels", winograd=2),
    cpu.Knobs(lanes=1, f_vectors=4, ow_tile=1, winograd=2),  # scalar lanes, a tile of one tile
    # In chunks of a row of tiles, every stage under the chunk's loop, and a register tile that does not divide the
    # chunk's tiles (test_winograd_chunks_of_several_rows: F(2, 3), pixels first, chunks of more rows).
    cpu.Knobs(lanes=8, f_vectors=1, ow_tile=2, winograd=4, chunk_rows=1),
    cpu.Knobs(lanes=4, f_vectors=2, ow_tile=3, order="filters", winograd=4, chunk_rows=1),
]


@pytest.mark.parametrize("knobs", WINOGRAD_KNOBS, ids=lambda k: f"F({k.winograd},3) {k.lanes}x{k.f_vectors}x{k.ow_tile}"
                                                             f"{f' chunks of {k.chunk_rows}' if k.chunk_rows else ''}")
@pytest.mark.parametrize("name", WINOGRAD_WORKLOADS)
def test_winograd_kernels(name, knobs):
    _check(WINOGRAD_WORKLOADS[name], knobs)


@pytest.mark.parametrize("m, chunk_rows", [(4, 2), (2, 2), (2, 4)])
def test_winograd_chunks_of_several_rows(m, chunk_rows):
    """Chunks of several rows of tiles (an image's 8 rows of pixels: 2 rows of F(4, 3)'s tiles, 4 of F(2, 3)'s),
    over two images; chunk rows that do not divide an image's rows of tiles are refused (a chunk would run into
    the next image's rows)."""
    wl = ConvWorkload(2, 8, 9, 16, 32, (3, 3), padding="same", activation="relu")
    _check(wl, cpu.Knobs(lanes=8, f_vectors=2, ow_tile=3, order="pixels", winograd=m, chunk_rows=chunk_rows))
    with pytest.raises(ValueError, match=r"Knobs\.chunk_rows must divide the 2 rows of F\(4, 3\)'s tiles .* got 3"):
        _check(wl, cpu.Knobs(lanes=8, f_vectors=2, ow_tile=3, winograd=4, chunk_rows=3))
    with pytest.raises(ValueError, match="chunk_rows=1 with winograd=0"):
        cpu.Knobs(lanes=8, f_vectors=2, ow_tile=3, chunk_rows=1)


@pytest.mark.parametrize("knobs", [{"winograd": 3}, {"winograd": 6}, {"winograd": 4, "flat": True}])
def test_unusable_winograd_tiles_are_refused(knobs):
    with pytest.raises(ValueError, match=r"Knobs\.winograd must be one of 0, 2, 4"):
        cpu.Knobs(lanes=8, f_vectors=2, ow_tile=4, **knobs)


@pytest.mark.parametrize("wl, layout", [
    (ConvWorkload(1, 8, 8, 16, 16, (5, 5), padding="same"), (16, 0, 4)),             # not 3x3
    (ConvWorkload(1, 8, 8, 16, 16, (3, 3), (2, 2), padding="same"), (16, 0, 4)),     # stride 2
    (ConvWorkload(1, 8, 8, 16, 16, (3, 3), padding="same"), (0, 0, 4)),              # Keras's weights
    (ConvWorkload(1, 8, 8, 16, 16, (3, 3), padding="same"), (16, 4, 4)),             # a flat tile
    (ConvWorkload(1, 8, 8, 16, 16, (3, 3), padding="same"), (16, 0, 3)),             # F(3, 3)
])
def test_a_winograd_layout_compute_cannot_honour_is_refused(wl, layout):
    """conv2d_forward refuses it, naming the argument; a tuning record whose PrimFunc claims it is unreadable
    (records.workload_of raises, and the log's index skips it with a warning)."""
    with pytest.raises(ValueError, match=r"winograd=\d: Winograd F\(m, 3\) takes m in \(2, 4\)"):
        wl.prim_func(*layout)
    forged = wl.prim_func(16, 0, 0).with_attr(tvmconv.compute.WINOGRAD_ATTR, layout[2])
    forged = forged.with_attr({tvmconv.compute.WEIGHT_BLOCK_ATTR: layout[0], tvmconv.compute.FLAT_TILE_ATTR: layout[1]})
    with pytest.raises(ValueError, match="winograd="):
        records.workload_of(forged)


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_matrices_compute_a_correlation(m):
    """Aᵀ [(G g) ⊙ (Bᵀ d)] is the correlation of m + 2 inputs d with 3 taps g, the identity F(m, 3) rests on."""
    a, b, g = winograd_matrices(m)
    assert a.shape == (m + 2, m) and b.shape == (m + 2, m + 2) and g.shape == (m + 2, 3)
    rng = np.random.default_rng(m)
    d, taps = rng.standard_normal(m + 2), rng.standard_normal(3)
    np.testing.assert_allclose(a.T @ ((g @ taps) * (b.T @ d)), np.correlate(d, taps, "valid"), rtol=1e-12, atol=1e-12)


def test_winograd_weights_are_transformed_once_when_packed():
    """pack_weights holds G w Gᵀ per point of the transform, in blocks of filters (zero past the last),
    computed in float64."""
    kernel = np.random.default_rng(0).standard_normal((3, 3, 5, 20)).astype(np.float32)
    g = winograd_matrices(4)[2]
    packed = pack_weights(kernel, 8, 4)
    assert packed.shape == (36, 3, 5, 8) and packed.dtype == np.float32
    points = np.einsum("ea,abcf,gb->egcf", g, kernel.astype(np.float64), g).reshape(36, 5, 20)
    unpacked = packed.transpose(0, 2, 1, 3).reshape(36, 5, 24)
    np.testing.assert_allclose(unpacked[..., :20], points, rtol=1e-6, atol=1e-6)
    assert not unpacked[..., 20:].any()


def test_winograd_is_tuned_in_a_task_of_its_own():
    """Winograd's variants are tasks of their own (one per weight block, as the direct sum's). A program
    sampled from its design space replays from its trace as a record does, and computes the convolution."""
    wl = ConvWorkload(1, 10, 10, 16, 32, (3, 3), padding="same")
    variants = find_rule(HOST).tunable_knobs(wl, HOST)
    layouts = [records.workload_of(c.mod["main"])[1] for c in tuning.tasks(wl, HOST, "template")]
    assert sorted(layouts) == sorted({k.layout for k in variants})
    winograd = [layout for layout in layouts if layout[2]]
    m = find_rule(HOST).default_knobs(wl, HOST).winograd
    assert m and winograd and {layout[2] for layout in winograd} == {m}
    context = tuning.tasks(wl, HOST, "template")[layouts.index(winograd[-1])]
    spaces = context.generate_design_space()
    assert len(spaces) == sum(k.layout == winograd[-1] for k in variants)
    _check(wl, None, record=records.Tuned("sampled", *winograd[-1], spaces[-1].trace, 1.0, 1, None))


@pytest.mark.parametrize("preset", ["x86-avx2", "x86-avx512"])
def test_winograd_chunks_where_each_chunk_reads_the_weights_cheaply(preset):
    """ResNet-50's 3x3 layer of width 56 takes Winograd in chunks of rows of tiles (its 590 KB of transformed
    weights, read by every chunk, come from L2), at batch 1 and 8: rows that divide an image's 14, a chunk for
    every core, a register tile that divides a chunk's tiles. The 512-channel layer of width 7 at batch 8 runs its
    stages over all tiles: chunks would each read its 38 MB of weights. Tuning searches both, chunks first."""
    target = targets.resolve(preset)
    for batch in (1, 8):
        wl = ConvWorkload(batch, 56, 56, 64, 64, (3, 3), padding="same")
        knobs = x86.RULE.default_knobs(wl, target)
        assert knobs.winograd == 4 and knobs.chunk_rows and 14 % knobs.chunk_rows == 0, knobs
        assert batch * 14 // knobs.chunk_rows >= target.attrs["num-cores"]
        assert (knobs.chunk_rows * 14) % knobs.ow_tile == 0, knobs
        variants = [k for k in x86.RULE.tunable_knobs(wl, target) if k.winograd]
        assert [k.chunk_rows for k in variants] == sorted((k.chunk_rows for k in variants), reverse=True)
        assert {k.chunk_rows for k in variants} == {knobs.chunk_rows, 0}
        assert all((k.chunk_rows * 14) % k.ow_tile == 0 for k in variants if k.chunk_rows)
    assert x86.RULE.default_knobs(ConvWorkload(8, 7, 7, 512, 512, (3, 3), padding="same"), target).chunk_rows == 0


def test_a_winograd_chunk_program_sampled_by_the_tuner_replays_and_computes():
    """A program of a chunked variant's design space (as tvmconv.tuning builds it), its register tile's width
    sampled among those that divide a chunk's tiles (2 rows of 4), replays from its trace as a record does and
    computes the convolution."""
    wl = ConvWorkload(1, 16, 16, 16, 32, (3, 3), padding="same")
    knobs = cpu.Knobs(lanes=8, f_vectors=1, ow_tile=4, winograd=4, chunk_rows=2)
    rule = find_rule(HOST)
    sch = tvm.s_tir.Schedule(wl.prim_func(*knobs.layout))
    rule.schedule(wl, sch, HOST, rule.sample_tiles(sch, wl, HOST, knobs))
    widths = next(inst.attrs[0] for inst in sch.trace.insts if inst.kind.name == "SampleCategorical")
    assert widths and all(8 % int(width) == 0 for width in widths), widths
    _check(wl, None, record=records.Tuned("sampled", *knobs.layout, sch.trace, 1.0, 1, None))


def test_window_unrolling_only_for_small_windows():
    target = targets.resolve("x86-avx512")
    small = ConvWorkload(1, 14, 14, 32, 32, (3, 3), padding="same", groups=32)
    # The weight gradient's layout: dz as 14x14 weights (tvmconv.backward.weight_gradient_workload).
    huge = ConvWorkload(32, 16, 16, 1, 32, (14, 14))
    assert x86.RULE.default_knobs(small, target).unroll_window
    assert {k.unroll_window for k in x86.RULE.tunable_knobs(small, target)} == {False, True}
    assert not any(k.unroll_window for k in x86.RULE.tunable_knobs(huge, target))
    assert not x86.RULE.default_knobs(ConvWorkload(1, 16, 16, 32, 32, (14, 14), groups=32), target).unroll_window


def test_pack_weights_layout():
    kernel = np.arange(3 * 2 * 5 * 20, dtype=np.float32).reshape(3, 2, 5, 20)
    packed = pack_weights(kernel, 8)
    assert packed.shape == (3, 3, 2, 5, 8)
    for f in range(24):
        expected = kernel[..., f] if f < 20 else 0
        np.testing.assert_array_equal(packed[f // 8, ..., f % 8], expected)
    assert pack_weights(kernel, 0) is kernel


def test_x86_vectors_never_straddle_groups_or_the_last_filter():
    avx512 = targets.resolve("x86-avx512")
    lanes = {name: x86.RULE.default_knobs(wl, avx512).lanes for name, wl in {
        "resnext, 4 filters per group": ConvWorkload(1, 56, 56, 128, 128, (3, 3), padding="same", groups=32),
        "8 filters per group": ConvWorkload(1, 28, 28, 256, 256, (3, 3), padding="same", groups=32),
        "24 filters": ConvWorkload(1, 8, 8, 8, 24, (3, 3)),
        "depthwise, 24 channels": ConvWorkload(1, 8, 8, 24, 24, (3, 3), groups=24),
        "depthwise, 96 channels": ConvWorkload(1, 8, 8, 96, 96, (3, 3), groups=96),
    }.items()}
    assert lanes == {"resnext, 4 filters per group": 4, "8 filters per group": 8, "24 filters": 8,
                     "depthwise, 24 channels": 8, "depthwise, 96 channels": 16}


def test_outputs_that_outgrow_the_last_level_cache_are_streamed_on_x86():
    """Where a call's input and output take over half the last-level cache and the output a quarter
    (MobileNetV2's 112x112x32 depthwise layer at batch 8: 25.7 MB, 12.8 of them output, against the 32 MiB the x86
    table assumes for a CPU other than this host's), the x86 defaults write the output with non-temporal stores,
    in every variant tuning searches; not at batch 1, not for a small output, not on ARM, not for an output the
    epilogue does not write (channels first, a last-axis activation after it), nor with Winograd; with AVX2,
    depthwise layers only."""
    avx512 = targets.resolve("x86-avx512")
    large = ConvWorkload(8, 112, 112, 32, 32, (3, 3), padding="same", groups=32)
    assert x86.core(avx512).l3_bytes == 32 << 20
    assert x86.RULE.default_knobs(large, avx512).stream_output
    assert all(k.stream_output for k in x86.RULE.tunable_knobs(large, avx512))
    pointwise = ConvWorkload(8, 56, 56, 24, 144, (1, 1))  # 2.4 MB in, 14.5 MB out
    assert x86.RULE.default_knobs(pointwise, avx512).stream_output
    # AVX2's vectors are half a cache line: there only depthwise layers stream (measured on Zen 3)
    avx2 = targets.resolve("x86-avx2")
    assert x86.core(avx2).l3_bytes == 32 << 20
    assert x86.RULE.default_knobs(large, avx2).stream_output
    assert not x86.RULE.default_knobs(pointwise, avx2).stream_output
    small_output = ConvWorkload(8, 56, 56, 144, 24, (1, 1))  # 14.5 MB in, 2.4 MB out: not a quarter of L3
    for plain in (dataclasses.replace(large, batch=1), dataclasses.replace(large, data_format="channels_first"),
                  dataclasses.replace(large, activation="softmax"), small_output):
        assert not x86.RULE.default_knobs(plain, avx512).stream_output, plain.label
    assert not find_rule(targets.resolve("aarch64")).default_knobs(large, targets.resolve("aarch64")).stream_output
    winograd = ConvWorkload(8, 56, 56, 64, 64, (3, 3), padding="same")
    knobs = x86.RULE.default_knobs(winograd, avx512)
    assert knobs.winograd and not knobs.stream_output
    assert not any(k.stream_output for k in x86.RULE.tunable_knobs(winograd, avx512) if k.winograd)
    with pytest.raises(ValueError, match=r"Knobs\.stream_output must be a bool, and False with Winograd; got 1"):
        cpu.Knobs(lanes=8, f_vectors=2, ow_tile=4, stream_output=1)
    with pytest.raises(ValueError, match=r"Knobs\.stream_output must be a bool, and False with Winograd"):
        cpu.Knobs(lanes=8, f_vectors=2, ow_tile=4, winograd=2, stream_output=True)
    arm = targets.resolve("aarch64")
    streamed = dataclasses.replace(find_rule(arm).default_knobs(large, arm), stream_output=True)
    with pytest.raises(ValueError, match=r"Knobs\.stream_output needs non-temporal stores, which the arm rule's"):
        build.scheduled(large, arm, find_rule(arm), streamed)


# Streamed outputs: 32 filters of float32 or 8 of float64 (a pixel's output is a whole number of 64-byte lines, so
# every vector store is aligned and becomes non-temporal), and 24 filters (96 bytes a pixel: only some pixels'
# stores are provably aligned, so the pass leaves them all plain). Direct tiles, flat tiles, depthwise.
STREAMED = {
    "3x3, 32 filters": (ConvWorkload(2, 9, 10, 16, 32, (3, 3), padding="same"),
                        cpu.Knobs(lanes=8, f_vectors=2, ow_tile=3, oh_tile=2, stream_output=True), True),
    "depthwise, relu, 32": (ConvWorkload(2, 10, 10, 32, 32, (3, 3), padding="same", groups=32, activation="relu"),
                            cpu.Knobs(lanes=8, f_vectors=4, ow_tile=4, pad_inline=True, unroll_window=True,
                                      order="pixels", stream_output=True), True),
    "1x1 flat, float64": (ConvWorkload(1, 7, 7, 16, 8, (1, 1), dtype="float64"),
                          cpu.Knobs(lanes=4, f_vectors=2, ow_tile=5, flat=True, stream_output=True), True),
    "3x3, 24 filters": (ConvWorkload(1, 9, 10, 8, 24, (3, 3), padding="same"),
                        cpu.Knobs(lanes=8, f_vectors=3, ow_tile=4, stream_output=True), False),
}


@pytest.mark.skipif(x86.RULE is not find_rule(HOST), reason="non-temporal stores are x86's; this host is not x86")
@pytest.mark.parametrize("name", STREAMED)
def test_streamed_outputs_compute_and_use_nontemporal_stores(name):
    wl, knobs, aligned = STREAMED[name]
    _check(wl, knobs)  # the output filled with NaN first: every element must be written
    asm = lowering.compile(build.scheduled(wl, HOST, x86.RULE, knobs), HOST).inspect_source("asm")
    stores = re.findall(r"vmovntp[sd]", asm)
    assert (len(stores) > 0, "sfence" in asm) == (aligned, aligned), asm.count("vmovntp")
    plain = lowering.compile(build.scheduled(wl, HOST, x86.RULE, dataclasses.replace(knobs, stream_output=False)),
                             HOST).inspect_source("asm")
    assert "vmovntp" not in plain and "sfence" not in plain
