"""Schedule registry: an ordered list of rules, the first that accepts a (workload, target) schedules it.

A rule is a module with `applies(workload, target) -> bool`, `default_knobs(workload, target)` and
`schedule(func, workload, target, knobs=None) -> s_tir.Schedule`; its knobs name the kernel layout
they expect (`kernel_block`, see `compute.pack_kernel`). Family modules go before the generic
CPU rule, which accepts every LLVM target.
"""
from . import arm, cpu, cuda, x86

RULES = [x86, arm, cuda, cpu]


def find_rule(wl, target):
    for rule in RULES:
        if rule.applies(wl, target):
            return rule
    raise NotImplementedError(f"no schedule in schedules/ handles target kind {target.kind.name!r}")
