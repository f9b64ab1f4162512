"""TVM's lowering of a scheduled program to a runtime module, with one pass of tvmconv's own after TVM's
passes: non-temporal output stores. Everything tvmconv compiles goes through `compile` (build.py's kernels,
tuning's candidates, bundles), so what is tuned and timed is what runs.

A template marks the loop that writes a large output (schedules.cpu.NONTEMPORAL_PRAGMA, `Knobs.stream_output`):
a plain store first reads each output line from memory, a non-temporal one writes it without reading it or
keeping it in the caches. TIR has no such store; LLVM has (`!nontemporal`), and TVM's LLVM code generator links
LLVM IR handed to it in a `pragma_import_llvm` attribute. So each vector store in a marked loop, to an address
provably aligned to its vector (up to 64 bytes), becomes a call of a one-store LLVM function with that metadata,
which LLVM inlines (alwaysinline); other stores stay as they are. Non-temporal stores are weakly ordered, so each
iteration of a parallel loop that made them ends with SFENCE: a thread's stores are then seen by the thread that
waits for it, whatever TVM's thread pool signals with.
"""
import tvm
from tvm import tirx
from tvm.sym.analyzer import Analyzer
from tvm_ffi.structural import structural_mutate, structural_visit

from .runtime import ALIGNMENT
from .schedules.cpu import NONTEMPORAL_PRAGMA

PIPELINE = "tvmconv"
_LLVM_TYPES = {"float32": "float", "float64": "double"}


def compile(mod, target: tvm.target.Target):
    """The runtime module of a scheduled PrimFunc or IRModule for `target`."""
    return tvm.compile(mod, target=target, tir_pipeline=PIPELINE).mod


def _pipeline():
    """TVM's default TIR pipeline, then the non-temporal stores (a factory, as tirx.register_tir_pipeline takes)."""
    default, finalize_host, finalize_device = tirx.get_tir_pipeline("default")

    @tvm.transform.module_pass(opt_level=0, name="tvmconv.NontemporalStores")
    def lower(mod: tvm.IRModule, _context) -> tvm.IRModule:
        mod = default(mod)
        for global_var, func in list(mod.functions.items()):
            if isinstance(func, tirx.PrimFunc):
                mod[global_var] = _nontemporal_stores(func)
        return mod
    return lower, finalize_host, finalize_device


tirx.register_tir_pipeline(PIPELINE, _pipeline)


def _dtype(expr) -> str:
    """An expression's dtype ("" for one without, e.g. a handle's): TVM 0.27's expressions carry it in their type."""
    return str(getattr(getattr(expr, "ty", None), "dtype", ""))


def _marked(body: tirx.Stmt) -> bool:
    """Whether `body` has a loop marked NONTEMPORAL_PRAGMA."""
    found = []

    def attribute(stmt, visitor):
        if stmt.attr_key == NONTEMPORAL_PRAGMA:
            found.append(stmt)
        else:
            visitor.default_visit(stmt)
    structural_visit(body, [(tirx.AttrStmt, attribute)])
    return bool(found)


def _nontemporal_stores(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """`func` with the vector stores under NONTEMPORAL_PRAGMA made non-temporal (and the pragma, which TVM's code
    generator does not know, removed); unchanged where it has none."""
    if not _marked(func.body):  # (a walk that calls Python only at attributes: every compile pays for it)
        return func
    analyzer = Analyzer()
    helpers: dict[str, str] = {}  # LLVM function name -> its definition

    def bind(stmt, mutator):
        # CSE names the index arithmetic: its alignment is only provable with the names bound.
        if _dtype(stmt.value).startswith("int"):
            analyzer.bind(stmt.var, stmt.value, allow_override=True)
        return mutator.default_mutate(stmt)

    def store(stmt, mutator):
        index, value = stmt.indices[-1], stmt.value
        if (len(stmt.indices) != 1 or stmt.buffer.scope() != "global" or not isinstance(index, tirx.Ramp)
                or not analyzer.can_prove(index.stride == 1)):
            return stmt
        dtype = tvm.DataType(_dtype(value))
        element = _LLVM_TYPES.get(str(dtype.with_lanes(1)))
        align = min(ALIGNMENT, dtype.lanes * dtype.bits // 8)  # the output buffers' own alignment at most
        offset, elements = analyzer.modular_set(index.base), align * 8 // dtype.bits
        if element is None or align & (align - 1) or offset.coeff % elements or offset.base % elements:
            return stmt
        name = f"tvmconv_nontemporal_store_{dtype.lanes}x{element}"
        helpers[name] = (f"define internal void @{name}(ptr %p, <{dtype.lanes} x {element}> %v) alwaysinline {{\n"
                         f"  store <{dtype.lanes} x {element}> %v, ptr %p, align {align}, !nontemporal !0\n"
                         f"  ret void\n}}\n")
        address = tirx.address_of(tirx.BufferLoad(stmt.buffer, [index.base]))
        return tirx.Evaluate(tirx.call_extern("void", name, address, value))

    def marked(stmt, mutator):
        if stmt.attr_key != NONTEMPORAL_PRAGMA:
            return mutator.default_mutate(stmt)
        return structural_mutate(stmt.body, [(tirx.BufferStore, store), (tirx.Bind, bind), (tirx.LetStmt, bind)])

    body = structural_mutate(func.body, [(tirx.AttrStmt, marked), (tirx.Bind, bind), (tirx.LetStmt, bind)])
    if not helpers:  # none provably aligned: the pragmas go, the stores stay
        return func.with_body(body)

    def fenced(loop, mutator):
        body = mutator.mutate(loop.body)
        if loop.kind == tirx.ForKind.PARALLEL:
            body = tirx.SeqStmt([body, tirx.Evaluate(tirx.call_llvm_intrin("void", "llvm.x86.sse.sfence"))])
        return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, body, loop.thread_binding,
                        loop.annotations, loop.step)

    body = structural_mutate(body, [(tirx.For, fenced)])
    code = "".join(helpers.values()) + "!0 = !{i32 1}\n"
    return func.with_body(tirx.AttrStmt(tvm.ir.StringImm(PIPELINE), "pragma_import_llvm", tvm.ir.StringImm(code),
                                        body))
