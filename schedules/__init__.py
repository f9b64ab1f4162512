"""Schedule registry: an ordered list of rules, the first that accepts a (workload, target) schedules it.

A rule is a module with `applies(workload, target) -> bool`, `default_knobs(workload, target)` and
`schedule(func, workload, target, knobs=None) -> s_tir.Schedule`. Per-target templates go before
the generic default, which accepts every CPU workload.
"""
from . import cpu_default

RULES = [cpu_default]


def find_rule(wl, target):
    for rule in RULES:
        if rule.applies(wl, target):
            return rule
    raise NotImplementedError(f"no schedule in schedules/ handles target kind {target.kind.name!r}")
