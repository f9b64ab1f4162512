"""The convolutions of real networks, batch excluded: the named workload sets of `tvmconv tune` and the bench.

ResNet-50 v1.5 (53 convolutions, 23 distinct), MobileNetV2 (52, 30 distinct: the stem, depthwise
and pointwise layers), ResNeXt-50 32x4d (its grouped 3x3 layers) and VGG-16 (3x3), as torchvision
builds them; float32, channels_last, no bias, linear (the epilogue a framework fuses separately).
Each distinct convolution carries how many times its network runs it: a stack's time is the sum.
"""
import collections
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
    network: str    # a key of NETWORKS
    kind: str       # "conv", "pointwise", "depthwise" or "grouped"
    spec: ConvSpec
    count: int = 1  # how many times the network runs this convolution

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


def mobilenetv2_convs() -> list[ConvSpec]:
    """Every convolution of torchvision's MobileNetV2: the 3x3 stem, then depthwise 3x3 and pointwise 1x1."""
    # (expansion t, output channels c, repeats n, first stride s), as in the paper and torchvision.
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]
    specs, size, in_channels = [ConvSpec(224, 224, 3, 32, 3, stride=2)], 112, 32
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
    return specs


def vgg16_convs() -> list[ConvSpec]:
    specs, size, in_channels = [], 224, 3
    for out_channels, convs in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):
        for _ in range(convs):
            specs.append(ConvSpec(size, size, in_channels, out_channels, 3))
            in_channels = out_channels
        size //= 2  # max-pool
    return specs


# Every convolution of each network, in order, repeats included.
NETWORK_CONVS = {
    "resnet50": lambda: resnet_bottleneck_convs((3, 4, 6, 3)),
    "mobilenet_v2": mobilenetv2_convs,
    # ResNeXt-50 32x4d's grouped 3x3 layers: bottleneck width = planes * 4/64 * 32 = 2 * planes.
    "resnext50": lambda: [s for s in resnet_bottleneck_convs((3, 4, 6, 3), groups=32, width_factor=2)
                          if s.groups == 32],
    "vgg16": vgg16_convs,
}
NETWORKS = tuple(NETWORK_CONVS)


def network_workloads(network: str) -> list[Workload]:
    """A network's distinct convolutions in order of first appearance, each with how many times it runs."""
    if network not in NETWORK_CONVS:
        raise ValueError(f"Unknown network {network!r}: expected one of {', '.join(NETWORKS)}")
    specs = NETWORK_CONVS[network]()
    counts = collections.Counter(specs)
    return [Workload(workload_name(network, s), network, conv_kind(s), s, counts[s]) for s in dict.fromkeys(specs)]


def all_workloads() -> list[Workload]:
    workloads = [w for network in NETWORKS for w in network_workloads(network)]
    names = [w.name for w in workloads]
    assert len(set(names)) == len(names), "workload names must be unique"
    return workloads


def conv_workload(workload: Workload, batch: int = 1) -> ConvWorkload:
    """The tvmconv workload of a network's convolution at this batch size."""
    s = workload.spec
    return ConvWorkload(batch, s.height, s.width, s.in_channels, s.filters, (s.kernel, s.kernel), (s.stride, s.stride),
                        padding=workload.padding, groups=s.groups, use_bias=False)
