"""Schedule rules: an ordered list; the first rule that applies to a target schedules its workloads.

Each rule is an object keeping this contract (like dlight's rules, per target family as topi's
schedule modules):

  name                                    "x86", "arm", "cuda" or "cpu": what builds report
  applies(target) -> bool                 whether it schedules code for this target
  default_knobs(workload, target)         the template's knobs for a workload by default; None for a
                                          workload whose schedule has no knobs (a gradient kernel)
  schedule(workload, sch, target, knobs)  schedule `sch`, an s_tir.Schedule of workload.prim_func(
                                          knobs.weight_block, knobs.flat_tile) (0, 0 without knobs), in
                                          place; NotImplementedError for a kind of workload it has no
                                          schedule for. Knobs may hold sampled decisions (tuning).
  tunable_knobs(workload, target)         the template's structural variants for a workload, one
                                          MetaSchedule design space each; [] where it has no template
                                          (tuning then searches MetaSchedule's generated space)
  sample_tiles(sch, workload, target, knobs)  `knobs` with its tile sizes turned into decisions
                                          sampled in `sch`; where the defaults' sizes are among the
                                          candidates, tuning measures them first

Knobs are frozen dataclasses; `weight_block` names the packed weight layout they read
(`compute.pack_weights`), `flat_tile` the compute's pixel axis they tile (`compute.conv2d_forward`).
Workloads are a `compute.ConvWorkload` or a `backward.GradientKernel`.
The x86 and arm rules are instances of cpu.CpuRule, each with its model of a core; the generic CPU
rule, last, accepts any LLVM target.
"""
from . import arm, cpu, cuda, tensor_cores, x86

RULES = [x86.RULE, arm.RULE, cuda.RULE, cpu.GENERIC]


def find_rule(target):
    for rule in RULES:
        if rule.applies(target):
            return rule
    raise NotImplementedError(f"no schedule in schedules/ handles target kind {target.kind.name!r}")


def register_intrinsics(names) -> None:
    """Register the tensor intrinsics among `names` (those a trace tensorizes with), before the trace is
    replayed: the rules register theirs when they first schedule with them, and a trace replayed in a fresh
    process may come first."""
    tensor_cores.register(set(names))
