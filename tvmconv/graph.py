"""A network's layer calls at concrete shapes: the workloads that tuning and export compile.

A network is a Conv2D layer, a Sequential or a functional Model (tvmconv.layer, tvmconv.model). Each
describes itself by `_layer_graph()`: its layers in call order, each with the index of the call whose
output it reads (-1: the network's input), and by `batch_input_shape`, its declared input (None or
with None axes where it declares none). This module reads that description and imports neither
class, so the compiler side (tvmconv.tuning) takes networks without importing the layer API.
"""
import dataclasses

from .compute import ConvWorkload


@dataclasses.dataclass
class LayerCall:
    """One call of a layer in a network, at concrete shapes."""
    layer: object  # a tvmconv Conv2D
    source: int    # the call whose output it reads; -1: the network's input
    workload: ConvWorkload


def layer_calls(network, input_shape=None) -> list[LayerCall]:
    """The layer calls of a Conv2D, Sequential or functional Model, in order, at this input shape
    (batch included; 3D means batch 1; None: the network's declared input, batch 1 if unknown).
    Layers not built yet are built for the shapes they get."""
    describe = getattr(network, "_layer_graph", None)
    if describe is None:
        raise TypeError(f"Expected a tvmconv Conv2D layer, Sequential or Model, got {type(network).__name__}")
    graph = describe()
    if not graph:
        raise ValueError(f"Model '{network.name}' has no layers")
    if input_shape is None:
        declared = network.batch_input_shape
        if declared is None or any(d is None for d in declared[1:]):
            raise ValueError("`input_shape` is needed, e.g. (1, 224, 224, 3): the model does not declare one")
        input_shape = (declared[0] or 1, *declared[1:])
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"`input_shape` must be 4D (batch, then the data format's three axes) or 3D without the "
                         f"batch, got {input_shape!r}")
    calls: list[LayerCall] = []
    for layer, source in graph:
        in_shape = shape if source < 0 else calls[source].workload.output_shape
        if not layer.built:
            layer.build(in_shape)
        calls.append(LayerCall(layer, source, layer.workload(in_shape)))
    return calls
