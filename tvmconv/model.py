"""Models of conv layers and R's composition rule: Sequential, functional Model, layer_input, layer_conv_2d."""
import inspect
import warnings

import numpy as np

from . import training
from .keras import settings, validation
from .keras.arrays import to_array
from .keras.symbolic import KerasTensor, _input_names
from .layer import Conv2D


def layer_input(shape, batch_size=None, dtype=None, name=None) -> KerasTensor:
    """A symbolic model input; `shape` excludes the batch axis, as keras.Input / R's layer_input."""
    if not isinstance(shape, (tuple, list)) or not all(d is None or (validation.is_int(d) and d > 0) for d in shape):
        raise ValueError(f"The `shape` argument must be a tuple of positive integers or None. Received: shape={shape!r}")
    if batch_size is not None:
        batch_size = validation.positive_int(batch_size, "batch_size")
    n = next(_input_names)
    return KerasTensor((batch_size, *shape), dtype or "float32", name=name or ("input_layer" if n == 0 else f"input_layer_{n}"))


class _Network:
    """What Sequential and Model share: layers in call order, weights, prediction and the summary."""

    layers: list

    def __call__(self, x):
        raise NotImplementedError

    def predict(self, x, batch_size=None, verbose=0):
        """Run in slices of `batch_size` samples (32 by default, as Keras) and concatenate."""
        batch_size = 32 if batch_size is None else validation.positive_int(batch_size, "batch_size")
        x = to_array(x, "`x`")
        if x.ndim == 0:
            raise ValueError(f"predict expects a batch of inputs. Received an array of shape {x.shape}")
        chunks = [self(x[i:i + batch_size]) for i in range(0, max(len(x), 1), batch_size)]
        if isinstance(chunks[0], list):  # a functional model with several outputs
            return [np.concatenate(parts) for parts in zip(*chunks)]
        return np.concatenate(chunks)

    # ------------------------------------------------------------ training (tvmconv.training)

    def compile(self, optimizer="rmsprop", loss=None, loss_weights=None):
        """As Keras: `optimizer` "sgd", "adam", "rmsprop" or an optimizer object (tvmconv.training.SGD,
        Adam, RMSprop with their learning rates and momentum options); `loss` "mse", "mae", "huber" or
        a callable loss(y_true, y_pred) (differentiated with JAX), for every output, or a list (one per
        output) or a dict keyed by the output layers' names; `loss_weights` likewise, a list or dict of
        numbers that weigh each output's loss in the total (default 1 each)."""
        if loss is None:
            raise ValueError("compile() needs a `loss`: 'mse', 'mae', 'huber' or a callable loss(y_true, y_pred)")
        self.optimizer = training.get_optimizer(optimizer)
        # Resolved once: an unknown loss fails here, and a callable one is wrapped for JAX once.
        if isinstance(loss, dict):
            loss = {name: training.get_loss(identifier) for name, identifier in loss.items()}
        elif isinstance(loss, (list, tuple)):
            loss = [training.get_loss(identifier) for identifier in loss]
        else:
            loss = training.get_loss(loss)
        if loss_weights is not None and not isinstance(loss_weights, (list, tuple, dict)):
            raise ValueError(f"`loss_weights` must be a list or a dict of numbers. "
                             f"Received: loss_weights={loss_weights!r}")
        self._loss, self._loss_weights = loss, loss_weights

    def _training_graph(self):
        """The graph, and a training.OutputLoss for each output, from compile's `loss` and `loss_weights`."""
        if getattr(self, "_loss", None) is None:
            raise RuntimeError(f"You must call `compile()` before training or evaluating model '{self.name}'.")
        graph = self._layer_graph()
        calls = output_calls(self)
        names = [graph[call][0].name for call in calls]
        losses = _per_output(self._loss, names, "loss", lambda function: function)
        weights = _per_output(1.0 if self._loss_weights is None else self._loss_weights, names, "loss_weights",
                              lambda w: validation.finite_float(w, "loss_weights"))
        return graph, [training.OutputLoss(*entry) for entry in zip(calls, names, losses, weights, strict=True)]

    def _xy(self, x, y, outputs: int):
        """x, and y as a list with one target per output (Keras takes a list or tuple for several outputs)."""
        x = to_array(x, "`x`")
        ys = list(y) if outputs > 1 and isinstance(y, (list, tuple)) else [y]
        if len(ys) != outputs:
            raise ValueError(f"`y` must have one target per output: the model has {outputs} outputs. Received "
                             f"{'a single array' if len(ys) == 1 else f'{len(ys)} targets'}")
        ys = [to_array(target, "`y`") for target in ys]
        for target in ys:
            if len(x) != len(target):
                raise ValueError(f"`x` and `y` must have the same number of samples. "
                                 f"Received: {len(x)} and {len(target)}")
        return x, ys

    @staticmethod
    def _result(loss: float, each: list[float]):
        """What Keras returns: the loss, or [total, each output's loss] for several outputs."""
        return loss if len(each) == 1 else [loss, *each]

    def train_on_batch(self, x, y):
        """One update on (x, y); returns the loss (and each output's, for several outputs)."""
        graph, losses = self._training_graph()
        x, ys = self._xy(x, y, len(losses))
        return self._result(*training.step(graph, losses, x, ys, self.optimizer))

    def evaluate(self, x, y, batch_size=None, verbose=0):
        """The mean loss over (x, y), in batches (32 by default), as train_on_batch reports it."""
        graph, losses = self._training_graph()
        x, ys = self._xy(x, y, len(losses))
        batch_size = 32 if batch_size is None else validation.positive_int(batch_size, "batch_size")
        totals = np.zeros(len(losses) + 1)
        for i in range(0, len(x), batch_size):
            loss, each = training.step(graph, losses, x[i:i + batch_size], [t[i:i + batch_size] for t in ys], None)
            totals += np.array([loss, *each]) * len(x[i:i + batch_size])
        totals = [float(v) / len(x) for v in totals]
        return self._result(totals[0], totals[1:])

    def fit(self, x, y, epochs=1, batch_size=None, validation_data=None, shuffle=True, verbose="auto"):
        """Keras's fit: returns a History whose `history` has "loss" (and "val_loss") per epoch, and each
        output's "<name>_loss" for several outputs."""
        graph, losses = self._training_graph()
        x, ys = self._xy(x, y, len(losses))
        epochs = validation.positive_int(epochs, "epochs")
        batch_size = 32 if batch_size is None else validation.positive_int(batch_size, "batch_size")
        if validation_data is not None and (not isinstance(validation_data, (tuple, list))
                                            or len(validation_data) != 2):
            raise ValueError("`validation_data` must be a tuple (x_val, y_val)")
        verbose = 1 if verbose == "auto" else verbose

        def evaluate(vx, vy):
            result = self.evaluate(vx, vy, batch_size)
            return result if isinstance(result, list) else [result]
        return training.fit(graph, losses, x, ys, self.optimizer, epochs, batch_size, validation_data,
                            validation.as_bool(shuffle, "shuffle"), bool(verbose), evaluate)

    def get_weights(self) -> list:
        return [w for layer in self.layers for w in layer.get_weights()]

    def set_weights(self, weights) -> None:
        weights = list(weights)
        expected = sum(len(layer.weights) for layer in self.layers)
        if len(weights) != expected:
            raise ValueError(f"You called `set_weights(weights)` on model '{self.name}' with a weight list of length "
                             f"{len(weights)}, but the model was expecting {expected} weights.")
        for layer in self.layers:
            count = len(layer.weights)
            layer.set_weights(weights[:count])
            weights = weights[count:]

    @property
    def weights(self) -> list:
        return [w for layer in self.layers for w in layer.weights]

    def count_params(self) -> int:
        return sum(layer.count_params() for layer in self.layers if layer.built)

    def _output_shapes(self) -> dict:
        return {}

    def summary(self, print_fn=print) -> None:
        shapes = self._output_shapes()
        rows = [(f"{layer.name} (Conv2D)", str(shapes.get(id(layer), "? (unbuilt)")),
                 str(layer.count_params()) if layer.built else "0 (unbuilt)") for layer in self.layers]
        header = ("Layer (type)", "Output Shape", "Param #")
        widths = [max(len(r[i]) for r in rows + [header]) + 2 for i in range(3)]
        line = "".join(h.ljust(w) for h, w in zip(header, widths))
        rule = "─" * len(line)
        total = self.count_params()
        text = [f'Model: "{self.name}"', rule, line, rule]
        text += ["".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        trainable = sum(layer.count_params() for layer in self.layers if layer.built and layer.trainable)
        text += [rule, f" Total params: {total}", f" Trainable params: {trainable}",
                 f" Non-trainable params: {total - trainable}"]
        print_fn("\n".join(text))


def _warn_if_incompatible(declared, shape, model_name):
    if declared is not None and any(d is not None and d != s for d, s in zip(declared[1:], shape[1:])):
        warnings.warn(f"Model '{model_name}' was constructed with input shape {declared}, but it was called on an "
                      f"input with incompatible shape {tuple(shape)}.", UserWarning, stacklevel=3)


class Sequential(_Network):
    def __init__(self, layers=None, name=None):
        if name is not None and not isinstance(name, str):
            raise TypeError(f"The `name` argument must be a string. Received: name={name!r}")
        self.name = name or settings.unique_name("sequential")
        self.layers: list[Conv2D] = []
        self._input: KerasTensor | None = None
        if layers is not None and not isinstance(layers, (list, tuple)):
            raise TypeError(f"The `layers` argument must be a list of layers or None. Received: {type(layers).__name__}")
        for layer in layers or []:
            self.add(layer)

    @property
    def batch_input_shape(self):
        if self._input is not None:
            return self._input.shape
        return self.layers[0].batch_input_shape if self.layers else None

    def add(self, layer) -> "Sequential":
        if isinstance(layer, KerasTensor) and layer.producer is None:
            if self.layers or self._input is not None:
                raise ValueError("An input (layer_input) can only be added to an empty Sequential model.")
            self._input = layer
            return self
        if not isinstance(layer, Conv2D):
            raise TypeError(f"Only tvmconv layers can be added to a Sequential model. Received: {layer!r} "
                            f"(of type {type(layer).__name__})")
        self.layers.append(layer)
        try:  # with a known input, shapes propagate now and a mismatch is reported at `add`, as in Keras
            self._output_shapes()
        except ValueError:
            self.layers.pop()
            raise
        return self

    def pop(self) -> Conv2D:
        if not self.layers:
            raise TypeError("There are no layers in the model.")
        return self.layers.pop()

    def _layer_graph(self) -> list[tuple[Conv2D, int]]:
        """(layer, the index of the call whose output it reads; -1: the input), in call order (tvmconv.graph)."""
        return [(layer, i - 1) for i, layer in enumerate(self.layers)]

    def _output_shapes(self) -> dict:
        shape, shapes = self.batch_input_shape, {}
        if shape is None:
            return shapes
        for layer in self.layers:
            if not layer.built and shape[layer._channel_axis] is not None:
                layer.build(shape)
            shape = layer.compute_output_shape(shape)
            shapes[id(layer)] = shape
        return shapes

    def __call__(self, x):
        x = to_array(x, "The model's input")
        _warn_if_incompatible(self.batch_input_shape, x.shape, self.name)
        for layer in self.layers:
            x = layer(x)
        return x


class Model(_Network):
    """A functional model over a graph of conv layers, from layer_input() to one or more outputs."""

    def __init__(self, inputs, outputs, name=None):
        inputs_list = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        if len(inputs_list) != 1 or not isinstance(inputs_list[0], KerasTensor) or inputs_list[0].producer is not None:
            raise ValueError("`inputs` must be the single symbolic tensor returned by layer_input(). "
                             f"Received: inputs={inputs!r}")
        self._single_output = not isinstance(outputs, (list, tuple))
        outputs_list = [outputs] if self._single_output else list(outputs)
        if not outputs_list or not all(isinstance(o, KerasTensor) for o in outputs_list):
            raise ValueError(f"`outputs` must be symbolic tensors from layer calls. Received: outputs={outputs!r}")
        self.name = name or settings.unique_name("functional")
        self.input, self.outputs = inputs_list[0], outputs_list
        self.layers, self._nodes = [], []  # nodes: the output tensors of layer calls, in call order
        for out in outputs_list:
            self._collect(out)

    def _collect(self, tensor: KerasTensor) -> None:
        if tensor is self.input or any(tensor is node for node in self._nodes):
            return
        if tensor.producer is None:
            raise ValueError(f"Output {tensor!r} is not connected to the model's input {self.input!r}.")
        self._collect(tensor.parent)
        self._nodes.append(tensor)
        if not any(tensor.producer is layer for layer in self.layers):
            self.layers.append(tensor.producer)

    def _output_shapes(self) -> dict:
        return {id(node.producer): node.shape for node in self._nodes}

    @property
    def batch_input_shape(self):
        return self.input.shape

    def _layer_graph(self) -> list[tuple[Conv2D, int]]:
        """(layer, the index of the call whose output it reads; -1: the input), in call order (tvmconv.graph):
        each call reads its parent node's output."""
        index = {id(node): i for i, node in enumerate(self._nodes)}
        return [(node.producer, index.get(id(node.parent), -1)) for node in self._nodes]

    def __call__(self, x):
        x = to_array(x, "The model's input")
        _warn_if_incompatible(self.input.shape, x.shape, self.name)
        values = {id(self.input): x}
        for node in self._nodes:
            values[id(node)] = node.producer(values[id(node.parent)])
        results = [values[id(o)] for o in self.outputs]
        return results[0] if self._single_output else results


def _per_output(spec, names: list[str], argument: str, convert) -> list:
    """One converted value per output from compile's `spec`: a single value for all outputs, a list in
    output order, or a dict keyed by the output layers' names."""
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(names))
        missing = [name for name in names if name not in spec]
        if unknown or missing:
            raise ValueError(f"`{argument}` keys must be the output layers' names {names}. Received keys "
                             f"{sorted(spec)}")
        return [convert(spec[name]) for name in names]
    if isinstance(spec, (list, tuple)):
        if len(spec) != len(names):
            raise ValueError(f"`{argument}` must have one entry per output ({len(names)}: {names}). Received "
                             f"{len(spec)} entries")
        return [convert(value) for value in spec]
    return [convert(spec)] * len(names)


def output_calls(network) -> list[int]:
    """The indices (in its `_layer_graph()` order) of the calls whose outputs a network returns."""
    if isinstance(network, Model):
        return [next(i for i, node in enumerate(network._nodes) if node is output) for output in network.outputs]
    return [len(network._layer_graph()) - 1]


def layer_conv_2d(object=None, filters=None, kernel_size=None, **kwargs):
    """R's `layer_conv_2d`: None → the layer; a Sequential → that model with the layer appended;
    a symbolic tensor → the output tensor; an array → the layer's output for it."""
    layer = Conv2D(filters, kernel_size, **kwargs)
    if object is None:
        return layer
    if isinstance(object, Sequential):
        return object.add(layer)
    if isinstance(object, KerasTensor):
        return layer(object)
    if isinstance(object, (Model, Conv2D)):
        raise TypeError(f"The `object` argument must be None, a Sequential model, a symbolic tensor or an array. "
                        f"Received: object of type {type(object).__name__}")
    return layer(object)


# help(layer_conv_2d) shows every Conv2D argument, with `object` first as in R.
layer_conv_2d.__signature__ = inspect.Signature(
    [inspect.Parameter("object", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)]
    + [p.replace(default=None) if p.name in ("filters", "kernel_size") else p
       for p in list(inspect.signature(Conv2D.__init__).parameters.values())[1:]])
