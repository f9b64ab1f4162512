"""The convolutions of real networks, batch excluded: the named workload sets of `tvmconv tune` and the bench.

ResNet-50 v1.5 (23 distinct convolutions), MobileNetV2 (depthwise and pointwise layers),
ResNeXt-50 32x4d (grouped 3x3) and VGG-16 (3x3), as torchvision builds them; float32,
channels_last, no bias, linear (the epilogue a framework fuses separately).
"""
import dataclasses

from .compute import ConvWorkload


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """One convolution of a network, batch excluded; square kernels and strides as in these networks."""

    height: int
    width: int
    in_channels: int
    filters: int
    kernel: int
    stride: int = 1
    groups: int = 1


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str       # e.g. "resnet50/conv3x3_56x56x64"
    network: str    # "resnet50", "mobilenetv2", "resnext50" or "vgg16"
    kind: str       # "conv", "pointwise", "depthwise" or "grouped"
    spec: ConvSpec

    @property
    def padding(self) -> str:
        # torchvision pads every k x k conv by k // 2, which is Keras "same" (up to where an odd total
        # pad goes, see torch_padding); 1x1 convs have no padding.
        return "same" if self.spec.kernel > 1 else "valid"


def conv_kind(spec: ConvSpec) -> str:
    if spec.groups == 1:
        return "pointwise" if spec.kernel == 1 else "conv"
    return "depthwise" if spec.groups == spec.in_channels == spec.filters else "grouped"


def workload_name(network: str, spec: ConvSpec) -> str:
    """network/conv{k}x{k}[s{stride}][g{groups}]_{H}x{W}x{C}[_to{filters}]; "dwconv" for depthwise."""
    kind = conv_kind(spec)
    op = "dwconv" if kind == "depthwise" else "conv"
    stride = f"s{spec.stride}" if spec.stride > 1 else ""
    groups = f"g{spec.groups}" if kind == "grouped" else ""
    filters = f"_to{spec.filters}" if spec.filters != spec.in_channels else ""
    return (f"{network}/{op}{spec.kernel}x{spec.kernel}{stride}{groups}_"
            f"{spec.height}x{spec.width}x{spec.in_channels}{filters}")


def distinct(specs) -> list[ConvSpec]:
    """The specs in order of first appearance, each once."""
    return list(dict.fromkeys(specs))


def resnet_bottleneck_convs(width_per_stage, groups=1, width_factor=1) -> list[ConvSpec]:
    """Every conv of a torchvision ResNet-50 style network (v1.5: the stride sits on the 3x3)."""
    convs = [ConvSpec(224, 224, 3, 64, 7, stride=2)]
    size, in_channels = 56, 64  # after the stem and its 3x3/2 max-pool
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), width_per_stage, strict=True)):
        width, out_channels = planes * width_factor, planes * 4
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            out_size = size // stride
            convs.append(ConvSpec(size, size, in_channels, width, 1))
            convs.append(ConvSpec(size, size, width, width, 3, stride, groups))
            convs.append(ConvSpec(out_size, out_size, width, out_channels, 1))
            if block == 0:  # projection shortcut: 1x1, stride 2 from stage 2 on
                convs.append(ConvSpec(size, size, in_channels, out_channels, 1, stride))
            size, in_channels = out_size, out_channels
    return convs


def resnet50_workloads() -> list[Workload]:
    specs = distinct(resnet_bottleneck_convs((3, 4, 6, 3)))
    assert len(specs) == 23, f"ResNet-50 has 23 distinct convolutions, enumerated {len(specs)}"
    return [Workload(workload_name("resnet50", s), "resnet50", conv_kind(s), s) for s in specs]


def resnext50_workloads() -> list[Workload]:
    # ResNeXt-50 32x4d: bottleneck width = planes * 4/64 * 32 = 2 * planes, 3x3 in 32 groups.
    specs = distinct(s for s in resnet_bottleneck_convs((3, 4, 6, 3), groups=32, width_factor=2) if s.groups == 32)
    return [Workload(workload_name("resnext50", s), "resnext50", "grouped", s) for s in specs]


def mobilenetv2_workloads() -> list[Workload]:
    """Depthwise 3x3 and pointwise 1x1 layers of torchvision's MobileNetV2 (the 3x3 stem excluded)."""
    # (expansion t, output channels c, repeats n, first stride s), as in the paper and torchvision.
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]
    specs, size, in_channels = [], 112, 32
    for expansion, out_channels, repeats, first_stride in settings:
        for i in range(repeats):
            stride = first_stride if i == 0 else 1
            hidden = in_channels * expansion
            if expansion != 1:
                specs.append(ConvSpec(size, size, in_channels, hidden, 1))
            specs.append(ConvSpec(size, size, hidden, hidden, 3, stride, groups=hidden))
            size //= stride
            specs.append(ConvSpec(size, size, hidden, out_channels, 1))
            in_channels = out_channels
    specs.append(ConvSpec(size, size, in_channels, 1280, 1))
    return [Workload(workload_name("mobilenetv2", s), "mobilenetv2", conv_kind(s), s) for s in distinct(specs)]


def vgg16_workloads() -> list[Workload]:
    specs, size, in_channels = [], 224, 3
    for out_channels, convs in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):
        for _ in range(convs):
            specs.append(ConvSpec(size, size, in_channels, out_channels, 3))
            in_channels = out_channels
        size //= 2  # max-pool
    return [Workload(workload_name("vgg16", s), "vgg16", "conv", s) for s in distinct(specs)]


def all_workloads() -> list[Workload]:
    workloads = resnet50_workloads() + mobilenetv2_workloads() + resnext50_workloads() + vgg16_workloads()
    names = [w.name for w in workloads]
    assert len(set(names)) == len(names), "workload names must be unique"
    return workloads


def conv_workload(workload: Workload, batch: int = 1) -> ConvWorkload:
    """The tvmconv workload of a network's convolution at this batch size."""
    s = workload.spec
    return ConvWorkload(batch, s.height, s.width, s.in_channels, s.filters, (s.kernel, s.kernel), (s.stride, s.stride),
                        padding=workload.padding, groups=s.groups, use_bias=False)


NETWORKS = {"resnet50": resnet50_workloads, "mobilenet_v2": mobilenetv2_workloads,
            "resnext50": resnext50_workloads, "vgg16": vgg16_workloads}
