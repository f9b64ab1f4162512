"""Symbolic tensors: a shape, a dtype and the layer call that produced them (for functional models)."""
import itertools

_input_names = itertools.count()


class KerasTensor:
    def __init__(self, shape, dtype="float32", producer=None, parent=None, name=None):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.producer = producer  # the layer whose call gave this tensor; None for an input
        self.parent = parent      # the tensor that call consumed
        self.name = name

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self):
        return f"<KerasTensor shape={self.shape}, dtype={self.dtype}, name={self.name}>"
