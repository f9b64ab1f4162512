"""Conv2D: Keras 3's convolution layer, as Keras's base_conv has it; its calls run on an Engine.

Arguments are validated once, here, with Keras's wording; nothing after the constructor re-checks
them. `build` creates the weights from the input's channel count; a call checks its input (once per
shape), turns the shape into a `ConvWorkload` and hands both to the layer's engine (tvmconv.engine),
which runs the kernel TVM compiled for it. A plain call of a shape seen before goes straight to the
engine's forward step for it.
"""
import numpy as np

from . import engine, rpc_devices, targets
from .compute import ConvWorkload, conv_output_shape
from .keras import activations, arrays, constraints, initializers, regularizers, settings, validation
from .keras.symbolic import KerasTensor
from .runtime import GpuTensor


class Conv2D:
    def __init__(self, filters, kernel_size, strides=(1, 1), padding="valid", data_format=None,
                 dilation_rate=(1, 1), groups=1, activation=None, use_bias=True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", kernel_regularizer=None,
                 bias_regularizer=None, activity_regularizer=None, kernel_constraint=None, bias_constraint=None,
                 input_shape=None, batch_input_shape=None, batch_size=None, dtype=None, name=None,
                 trainable=True, weights=None, target=None, threads=None, remote=None, tf32=False):
        self.groups = validation.positive_int(groups, "groups")
        self.filters = validation.positive_int(filters, "filters")
        if self.filters % self.groups:
            raise ValueError("The number of filters must be evenly divisible by the number of groups. "
                             f"Received: groups={groups}, filters={filters}.")
        self.kernel_size = validation.standardize_tuple(kernel_size, "kernel_size")
        self.strides = validation.standardize_tuple(strides, "strides")
        self.dilation_rate = validation.standardize_tuple(dilation_rate, "dilation_rate")
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError("`strides > 1` not supported in conjunction with `dilation_rate > 1`. "
                             f"Received: strides={self.strides} and dilation_rate={self.dilation_rate}")
        self.padding = validation.standardize_padding(padding)
        self.data_format = validation.standardize_data_format(data_format)
        self.activation = activations.get(activation)
        self.use_bias = validation.as_bool(use_bias, "use_bias")
        self.kernel_initializer = initializers.get(kernel_initializer, "kernel_initializer")
        self.bias_initializer = initializers.get(bias_initializer, "bias_initializer")
        self.kernel_regularizer = regularizers.get(kernel_regularizer, "kernel_regularizer")
        self.bias_regularizer = regularizers.get(bias_regularizer, "bias_regularizer")
        self.activity_regularizer = regularizers.get(activity_regularizer, "activity_regularizer")
        self.kernel_constraint = constraints.get(kernel_constraint, "kernel_constraint")
        self.bias_constraint = constraints.get(bias_constraint, "bias_constraint")
        self.dtype, self.compute_dtype = settings.dtype_policy(dtype)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"The `name` argument must be a string. Received: name={name!r}")
        self.name = name or settings.unique_name("conv2d")
        self.trainable = validation.as_bool(trainable, "trainable")
        self.target, self._target_given = targets.resolve(target), target
        self._on_gpu = self.target.kind.name == "cuda"  # read per call; the target's attributes cost ~0.6 µs
        self.threads = None if threads is None else validation.positive_int(threads, "threads")
        self.remote = rpc_devices.standardize(remote)
        self.tf32 = targets.check_tf32(validation.as_bool(tf32, "tf32"), self.target, self.compute_dtype)
        self._engine = engine.Engine(self.target, self.threads, self.remote, self.name)
        self.batch_input_shape = validation.batch_input_shape(input_shape, batch_input_shape, batch_size)
        self._initial_weights = validation.weight_list(weights, "weights")
        self._kernel = self._bias = None
        self._workloads: dict[tuple, ConvWorkload] = {}  # per input shape, checked once
        self._steps: dict[tuple, object] = {}  # per input shape: the engine's forward step, for a plain call
        self._step_dtype = np.dtype(self.compute_dtype)
        self._activity_losses: list[float] = []
        self.built = False
        if self.batch_input_shape is not None and self.batch_input_shape[self._channel_axis] is not None:
            self.build(self.batch_input_shape)

    # ------------------------------------------------------------ shapes

    _channel_axis = property(lambda self: -1 if self.data_format == "channels_last" else 1)

    def compute_output_shape(self, input_shape) -> tuple:
        input_shape = tuple(input_shape)
        validation.check_conv_input(input_shape, self.name, self._channel_axis,
                                    self.input_channels if self.built else None, self.groups)
        shape = conv_output_shape(input_shape, self.filters, self.kernel_size, self.strides, self.dilation_rate,
                                  self.padding, self.data_format == "channels_last")
        if self.activation == "glu":  # a * sigmoid(b) over the two halves of the last axis
            if shape[-1] is not None and shape[-1] % 2:
                raise ValueError(f"The 'glu' activation splits the last axis of the output in two halves, but "
                                 f"it has odd length {shape[-1]} (output shape {shape}).")
            shape = (*shape[:-1], None if shape[-1] is None else shape[-1] // 2)
        return shape

    # ------------------------------------------------------------ weights

    def build(self, input_shape) -> None:
        input_shape = tuple(input_shape)
        self.compute_output_shape(input_shape)  # checks the shape
        if self.built:
            return
        self.input_channels = int(input_shape[self._channel_axis])
        self.built = True
        shape = (*self.kernel_size, self.input_channels // self.groups, self.filters)
        self._assign(self.kernel_initializer(shape, dtype=self.dtype),
                     self.bias_initializer((self.filters,), dtype=self.dtype) if self.use_bias else None)
        if self._initial_weights is not None:
            self.set_weights(self._initial_weights)
            self._initial_weights = None

    kernel = property(lambda self: self._kernel)
    bias = property(lambda self: self._bias)
    weights = property(lambda self: [w for w in (self._kernel, self._bias) if w is not None])
    trainable_weights = property(lambda self: self.weights if self.trainable else [])
    non_trainable_weights = property(lambda self: [] if self.trainable else self.weights)

    def get_weights(self) -> list:
        return [w.copy() for w in self.weights]

    def set_weights(self, weights) -> None:
        validation.weight_list(weights, "weights")
        expected = self.weights
        if len(weights) != len(expected):
            raise ValueError(f"You called `set_weights(weights)` on layer '{self.name}' with a weight list of "
                             f"length {len(weights)}, but the layer was expecting {len(expected)} weights.")
        new_weights = [arrays.to_array(w, f"`weights[{i}]`") for i, w in enumerate(weights)]
        for current, new in zip(expected, new_weights):
            if current.shape != new.shape:
                raise ValueError(f"Layer {self.name} weight shape {current.shape} is not compatible with provided "
                                 f"weight shape {new.shape}.")
        self._assign(*new_weights)

    def _assign(self, kernel, bias=None) -> None:
        """The one place weights change. They are stored read-only, so an in-place edit cannot bypass the
        engine's packed copies."""
        self._kernel, self._bias = [None if w is None else np.array(w, dtype=self.dtype) for w in (kernel, bias)]
        for w in self.weights:
            w.flags.writeable = False
        self._engine.set_weights(self._kernel, self._bias)
        self._steps = {}

    def count_params(self) -> int:
        if not self.built:
            raise ValueError(f"You tried to call `count_params` on layer '{self.name}', but the layer isn't built. "
                             "You can build it manually via: `layer.build(input_shape)`.")
        return sum(int(w.size) for w in self.weights)

    @property
    def losses(self) -> list:
        """Regularizer terms: of the weights as they are now, and of the last call's output."""
        terms = [reg(w) for reg, w in ((self.kernel_regularizer, self._kernel), (self.bias_regularizer, self._bias))
                 if reg is not None and w is not None]
        return [float(t) for t in terms] + list(self._activity_losses)

    # ------------------------------------------------------------ calls

    def workload(self, input_shape) -> ConvWorkload:
        """The compiled kernel's description for a concrete input shape."""
        n, h, w, c = input_shape if self.data_format == "channels_last" else [input_shape[i] for i in (0, 2, 3, 1)]
        return ConvWorkload(int(n), int(h), int(w), int(c), self.filters, self.kernel_size, self.strides,
                            self.dilation_rate, self.padding, self.groups, self.data_format, self.compute_dtype,
                            self.use_bias, self.activation if isinstance(self.activation, str) else "linear", self.tf32)

    def _input(self, inputs, what: str = "Input 0", gpu: bool = False) -> tuple:
        """The input as an array (with `gpu`, a tensor on a CUDA layer's GPU as a runtime.GpuTensor), and its
        workload (None for an empty batch), the layer built for it. A shape is checked on its first call."""
        # (a numpy array, the common case, skips to_array: its checks and this message cost ~0.3 µs a call)
        x = inputs if type(inputs) is np.ndarray else arrays.to_array(inputs, f"{what} of layer '{self.name}'",
                                                                       gpu and self._on_gpu)
        if x.dtype.kind not in "biuf":
            raise TypeError(f"{what} of layer '{self.name}' must be a real numeric array (it is cast to "
                            f"{self.compute_dtype}). Received dtype={x.dtype}")
        wl = self._workloads.get(x.shape)
        if wl is None:
            self.compute_output_shape(x.shape)  # validates the shape, before anything compiles
            if self.activation in activations.UNCALLABLE:
                raise TypeError(f"The activation '{self.activation}' needs `threshold` and `default_value` "
                                "arguments: pass a callable such as lambda x: keras.activations.threshold(x, t, v).")
            if not self.built:
                self.build(x.shape)
            if x.shape[0] == 0:
                return x, None
            wl = self._workloads[x.shape] = self.workload(x.shape)
        return x, wl

    def compiled_kernel(self, input_shape):
        """The kernel for this input shape (build.CompiledKernel: what ran, from where, with which schedule)."""
        return self._engine.kernel(self.workload(tuple(int(d) for d in input_shape)))

    def kernel_arguments(self, inputs) -> list:
        """The compiled kernel's arguments for one call (input, weights as the kernel reads them, a fresh
        output), for timing the bare kernel with `compiled_kernel(shape).time_evaluator()`."""
        x, wl = self._input(inputs)
        return self._engine.kernel_arguments(wl, x)

    def __setattr__(self, name, value):
        if name in ("activation", "activity_regularizer"):  # a call's result changes: the shapes' caches start anew
            self.__dict__.update(_workloads={}, _steps={})
        object.__setattr__(self, name, value)

    def __call__(self, inputs):
        # A plain call (numpy, the compute dtype, a shape called before; no Python activation, activity regularizer
        # or RPC) goes straight to its forward step: after a kernel has filled L2 each object Python touches is a
        # cache miss, and the checks below added 3.0 µs where this adds 1.3 (Sapphire Rapids,
        # docs/benchmark_history.md).
        if type(inputs) is np.ndarray and inputs.dtype is self._step_dtype:
            step = self._steps.get(inputs.shape)
            if step is not None:
                return step(inputs)
        if isinstance(inputs, KerasTensor):
            return self._symbolic_call(inputs)
        x, wl = self._input(inputs, gpu=True)
        if type(x) is GpuTensor:
            arrays.check_gpu_input(x, self.name, self.compute_dtype,
                                   callable(self.activation) or self.activity_regularizer is not None)
        if wl is None:  # an empty batch has an empty answer; nothing to compile
            return np.empty(self.compute_output_shape(x.shape), dtype=self.compute_dtype)
        step = self._engine.forward_step(wl)
        y = step(x)  # a tensor on the GPU for a GpuTensor x
        if (type(x) is np.ndarray and x.dtype is self._step_dtype and self.remote is None
                and not callable(self.activation) and self.activity_regularizer is None):
            self._steps[x.shape] = step
        if callable(self.activation):
            y = np.asarray(self.activation(y), dtype=self.compute_dtype)
        if self.activity_regularizer is not None:
            # Keras divides the activity penalty by the batch size.
            self._activity_losses = [float(self.activity_regularizer(y)) / x.shape[0]]
        return y

    def gradients(self, inputs, output_gradient, *, output=None, input_gradient=True) -> dict:
        """{"input": dL/dx, "kernel": dL/dW (Keras's layout), "bias": dL/db or None} given `output_gradient` =
        dL/dy for y = layer(inputs), by TVM kernels (tvmconv.backward), regularizers not included. `output`, y
        itself, saves recomputing the pre-activation; `input_gradient=False` skips dL/dx (a first layer's)."""
        if callable(self.activation) or self.activation in activations.UNCALLABLE:
            raise NotImplementedError(f"gradients need a named activation compiled into the kernel; layer "
                                      f"'{self.name}' has {activations.serialize(self.activation)!r}")
        x, wl = self._input(inputs)
        dy, output = arrays.gradient_arrays(output_gradient, output, self.compute_output_shape(x.shape), x.shape)
        return self._engine.gradients(wl, x, dy, output, validation.as_bool(input_gradient, "input_gradient"))

    def _symbolic_call(self, inputs: KerasTensor) -> KerasTensor:
        if not self.built:
            self.build(inputs.shape)
        return KerasTensor(self.compute_output_shape(inputs.shape), self.compute_dtype, producer=self,
                           parent=inputs, name=self.name)

    def _layer_graph(self) -> list:
        """A lone layer as a network (tvmconv.graph): one call, reading the input."""
        return [(self, -1)]

    # ------------------------------------------------------------ config

    def get_config(self) -> dict:
        config = {name: getattr(self, name) for name in (
            "name", "trainable", "filters", "kernel_size", "strides", "padding", "data_format", "dilation_rate",
            "groups", "use_bias")}
        config["dtype"] = "mixed_float16" if self.compute_dtype != self.dtype else self.dtype
        config["activation"] = activations.serialize(self.activation)
        for module, names in ((initializers, ("kernel_initializer", "bias_initializer")),
                              (regularizers, ("kernel_regularizer", "bias_regularizer", "activity_regularizer")),
                              (constraints, ("kernel_constraint", "bias_constraint"))):
            config.update({name: module.serialize(getattr(self, name)) for name in names})
        # Given, not defaults; a live RPC session is not configuration.
        for name, value in (("target", self._target_given), ("threads", self.threads), ("remote", self.remote),
                            ("tf32", self.tf32 or None)):
            if value is not None and not (name == "remote" and not isinstance(value, (str, dict))):
                config[name] = value
        return config

    @classmethod
    def from_config(cls, config: dict) -> "Conv2D":
        return cls(**config)

    def __repr__(self):
        return f"<Conv2D name={self.name}, filters={self.filters}, kernel_size={self.kernel_size}, built={self.built}>"
