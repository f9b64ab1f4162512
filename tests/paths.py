"""One small workload per kernel path the schedules special-case, shared by the per-target tests.

Filter counts per group fill a 512-bit vector (narrower counts get narrower vectors)."""
from tvmconv.compute import ConvWorkload

PATHS = {
    "3x3": ConvWorkload(1, 9, 10, 8, 32, (3, 3), padding="same"),
    "1x1": ConvWorkload(1, 7, 7, 32, 48, (1, 1)),
    "depthwise": ConvWorkload(1, 10, 10, 32, 32, (3, 3), padding="same", groups=32),
    "grouped": ConvWorkload(1, 8, 8, 32, 64, (3, 3), padding="same", groups=2),
    "stride 2": ConvWorkload(1, 11, 9, 6, 16, (3, 3), (2, 2), padding="same"),
    "first layer 7x7 s2": ConvWorkload(1, 17, 15, 3, 16, (7, 7), (2, 2), padding="same"),
}
