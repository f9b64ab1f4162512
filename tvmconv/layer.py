"""Conv2D: Keras 3's convolution layer whose forward pass runs a kernel TVM compiled from our compute.

Arguments are validated once, here, with Keras's wording; nothing after the constructor re-checks
them. `build` creates the weights from the input's channel count; a call turns the input shape into
a `ConvWorkload`, fetches the compiled kernel for it (memory, then disk, then compile) and runs it.
"""
import dataclasses
import itertools
import threading

import numpy as np

from . import (
    activations,
    backward,
    constraints,
    initializers,
    keras_config,
    regularizers,
    runtime,
    targets,
    validation,
)
from . import build as kernel_build
from . import remote as remote_devices
from .compute import ConvWorkload, conv_output_length, pack_kernel
from .symbolic import KerasTensor

SUPPORTED_DTYPES = ("float16", "float32", "float64")
_name_counters: dict[str, itertools.count] = {}
_name_lock = threading.Lock()


def unique_name(prefix: str) -> str:
    """Keras's automatic names: "conv2d", then "conv2d_1", "conv2d_2", ... per process."""
    with _name_lock:
        n = next(_name_counters.setdefault(prefix, itertools.count()))
    return prefix if n == 0 else f"{prefix}_{n}"


def _dtype_policy(dtype) -> tuple[str, str]:
    """(variable dtype, compute dtype) from a dtype, a dtype name, a Keras policy name, object or config."""
    if dtype is None:
        dtype = keras_config.floatx()
    if isinstance(dtype, dict):  # Keras's serialized DTypePolicy
        dtype = dtype.get("config", {}).get("name", dtype)
    name = getattr(dtype, "name", dtype)  # a Keras DTypePolicy or a numpy dtype
    if not isinstance(name, str):
        try:
            name = np.dtype(name).name
        except TypeError:
            name = repr(dtype)
    if name == "mixed_float16":
        return "float32", "float16"
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"Invalid `dtype` argument: {dtype!r}. tvmconv supports "
                         f"{', '.join(SUPPORTED_DTYPES)} and the policy 'mixed_float16'.")
    return name, name


def _shape_tuple(value, name: str, length: int, allow_none: bool = True):
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != length or not all(
            (v is None and allow_none) or (validation.is_int(v) and v > 0) for v in value):
        raise ValueError(f"The `{name}` argument must be a tuple of {length} positive integers"
                         f"{' or None' if allow_none else ''}. Received: {name}={value!r}")
    return tuple(None if v is None else int(v) for v in value)


def to_array(x) -> np.ndarray:
    """numpy arrays as they are; DLPack producers (torch, jax, ...) without a copy where possible."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except (TypeError, RuntimeError, BufferError):
            pass
    return np.asarray(x)


class Conv2D:
    def __init__(self, filters, kernel_size, strides=(1, 1), padding="valid", data_format=None,
                 dilation_rate=(1, 1), groups=1, activation=None, use_bias=True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", kernel_regularizer=None,
                 bias_regularizer=None, activity_regularizer=None, kernel_constraint=None, bias_constraint=None,
                 input_shape=None, batch_input_shape=None, batch_size=None, dtype=None, name=None,
                 trainable=True, weights=None, target=None, threads=None, remote=None):
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
        self.dtype, self.compute_dtype = _dtype_policy(dtype)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"The `name` argument must be a string. Received: name={name!r}")
        self.name = name or unique_name("conv2d")
        self.trainable = validation.as_bool(trainable, "trainable")
        self.target = targets.resolve(target)
        self._target_given = target
        self.threads = None if threads is None else validation.positive_int(threads, "threads")
        self.remote = validation.remote(remote)
        self._outputs = runtime.OutputPool()
        self._can_run = False
        # R's input arguments: the declared input, batch axis included (None = any size).
        input_shape = _shape_tuple(input_shape, "input_shape", 3)
        batch_input_shape = _shape_tuple(batch_input_shape, "batch_input_shape", 4)
        if batch_size is not None:
            batch_size = validation.positive_int(batch_size, "batch_size")
        if batch_input_shape is None and input_shape is not None:
            batch_input_shape = (batch_size, *input_shape)
        self.batch_input_shape = batch_input_shape
        if weights is not None and not isinstance(weights, (list, tuple)):
            raise TypeError(f"The `weights` argument must be a list of arrays like get_weights(). "
                            f"Received: weights of type {type(weights).__name__}")
        self._initial_weights = weights
        self._kernel = self._bias = None
        self._device_weights: dict[tuple, list] = {}
        self._kernels: dict[tuple, object] = {}  # compiled kernels (and gradient kernels) by use and shape
        self._activity_losses: list[float] = []
        self.built = False
        if self.batch_input_shape is not None and self.batch_input_shape[self._channel_axis] is not None:
            self.build(self.batch_input_shape)

    # ------------------------------------------------------------ shapes

    @property
    def _channel_axis(self) -> int:
        return -1 if self.data_format == "channels_last" else 1

    def _check_input_shape(self, shape) -> None:
        if len(shape) != 4:
            raise ValueError(f"Input 0 of layer '{self.name}' is incompatible with the layer: expected ndim=4, "
                             f"found ndim={len(shape)}. Full shape received: {tuple(shape)}")
        channels = shape[self._channel_axis]
        if channels is None:
            raise ValueError(f"The channel dimension of the inputs (axis {self._channel_axis}) should be defined. "
                             f"Received input shape {tuple(shape)}")
        if self.built and channels != self.input_channels:
            raise ValueError(f"Input 0 of layer '{self.name}' is incompatible with the layer: expected axis "
                             f"{self._channel_axis} of input shape to have value {self.input_channels}, but "
                             f"received input with shape {tuple(shape)}")
        if channels % self.groups:
            raise ValueError("The number of input channels must be evenly divisible by the number of groups. "
                             f"Received groups={self.groups}, but the input has {channels} channels "
                             f"(full input shape is {tuple(shape)}).")
        spatial = shape[1:3] if self.data_format == "channels_last" else shape[2:4]
        for length, k, s, d in zip(spatial, self.kernel_size, self.strides, self.dilation_rate):
            if length is not None and conv_output_length(length, k, s, d, self.padding) <= 0:
                raise ValueError("Computed output size would be zero or negative. Received "
                                 f"`inputs shape={tuple(shape)}`, `kernel shape={self.kernel_size}`, "
                                 f"`dilation_rate={self.dilation_rate}`, `strides={self.strides}`, "
                                 f"`padding={self.padding}`.")

    def compute_output_shape(self, input_shape) -> tuple:
        input_shape = tuple(input_shape)
        self._check_input_shape(input_shape)
        spatial = input_shape[1:3] if self.data_format == "channels_last" else input_shape[2:4]
        out = [None if n is None else conv_output_length(n, k, s, d, self.padding)
               for n, k, s, d in zip(spatial, self.kernel_size, self.strides, self.dilation_rate)]
        if self.data_format == "channels_last":
            shape = (input_shape[0], *out, self.filters)
        else:
            shape = (input_shape[0], self.filters, *out)
        if self.activation == "glu":  # a * sigmoid(b) over the two halves of the last axis
            if shape[-1] is not None and shape[-1] % 2:
                raise ValueError(f"The 'glu' activation splits the last axis of the output in two halves, but "
                                 f"it has odd length {shape[-1]} (output shape {shape}).")
            shape = (*shape[:-1], None if shape[-1] is None else shape[-1] // 2)
        return shape

    # ------------------------------------------------------------ weights

    def build(self, input_shape) -> None:
        input_shape = tuple(input_shape)
        self._check_input_shape(input_shape)
        if self.built:
            return
        self.input_channels = int(input_shape[self._channel_axis])
        self.built = True
        self._assign(self.kernel_initializer(self._kernel_shape, dtype=self.dtype),
                     self.bias_initializer((self.filters,), dtype=self.dtype) if self.use_bias else None)
        if self._initial_weights is not None:
            self.set_weights(self._initial_weights)
            self._initial_weights = None

    @property
    def _kernel_shape(self) -> tuple:
        return (*self.kernel_size, self.input_channels // self.groups, self.filters)

    @property
    def kernel(self):
        return self._kernel

    @property
    def bias(self):
        return self._bias

    @property
    def weights(self) -> list:
        return [w for w in (self._kernel, self._bias) if w is not None]

    @property
    def trainable_weights(self) -> list:
        return self.weights if self.trainable else []

    @property
    def non_trainable_weights(self) -> list:
        return [] if self.trainable else self.weights

    def get_weights(self) -> list:
        return [w.copy() for w in self.weights]

    def set_weights(self, weights) -> None:
        if not isinstance(weights, (list, tuple)):
            raise TypeError(f"set_weights expects a list of arrays. Received: {type(weights).__name__}")
        expected = self.weights
        if len(weights) != len(expected):
            raise ValueError(f"You called `set_weights(weights)` on layer '{self.name}' with a weight list of "
                             f"length {len(weights)}, but the layer was expecting {len(expected)} weights.")
        arrays = [np.asarray(to_array(w)) for w in weights]
        for current, new in zip(expected, arrays):
            if current.shape != new.shape:
                raise ValueError(f"Layer {self.name} weight shape {current.shape} is not compatible with provided "
                                 f"weight shape {new.shape}.")
        self._assign(*arrays)

    def _assign(self, kernel, bias=None) -> None:
        """The one place weights change. They are stored read-only, so an in-place edit cannot bypass the
        invalidation of the device copies below."""
        self._kernel, self._bias = [None if w is None else np.array(w, dtype=self.dtype) for w in (kernel, bias)]
        for w in self.weights:
            w.flags.writeable = False
        self._device_weights = {}

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
        if self.data_format == "channels_last":
            n, h, w, c = input_shape
        else:
            n, c, h, w = input_shape
        return ConvWorkload(int(n), int(h), int(w), int(c), self.filters, self.kernel_size, self.strides,
                            self.dilation_rate, self.padding, self.groups, self.data_format, self.compute_dtype,
                            self.use_bias, self.activation if isinstance(self.activation, str) else "linear")

    def compiled_kernel(self, input_shape) -> kernel_build.CompiledKernel:
        """The kernel for this input shape (what ran, from where, with which schedule)."""
        input_shape = tuple(int(d) for d in input_shape)
        return self._kernel_for(input_shape, lambda: self.workload(input_shape))

    def _kernel_for(self, key, workload) -> kernel_build.CompiledKernel:
        """The compiled kernel kept under `key`, fetched the first time for the workload `workload()` gives."""
        compiled = self._kernels.get(key)
        if compiled is None:
            compiled = self._kernels[key] = kernel_build.get_kernel(workload(), self.target)
        return compiled

    def _check_can_run(self) -> None:
        """Refuse, before compiling anything, a call that could not run: clear errors, not a crash. Checked
        once per layer: the checks cost ~0.5 ms, and target and remote never change."""
        if self._can_run:
            return
        if self.target.kind.name == "cuda" and self.remote is not None:
            raise NotImplementedError(f"layer '{self.name}': CUDA kernels run on this machine's GPU, not over RPC "
                                      f"(remote={self.remote!r}); export them to run on another machine")
        if self.remote is None:
            targets.check_runnable_here(self.target)
        self._can_run = True

    def _runner(self, compiled: kernel_build.CompiledKernel):
        """What runs `compiled`: its module in this process, or its library uploaded to the remote board."""
        if self.remote is None:
            return compiled.kernel
        return remote_devices.remote_kernel(remote_devices.connect(self.remote), compiled.library)

    def kernel_arguments(self, inputs) -> list:
        """The compiled kernel's arguments for one call (input, weights as the kernel reads them, a fresh
        output), for timing the bare kernel with `compiled_kernel(shape).time_evaluator()`."""
        x = to_array(inputs).astype(self.compute_dtype, copy=False)
        self.compute_output_shape(x.shape)
        if not self.built:
            self.build(x.shape)
        if self.remote is not None:
            raise ValueError(f"kernel_arguments are for timing kernels in this process; layer '{self.name}' "
                             f"runs on remote={self.remote!r}")
        self._check_can_run()
        compiled = self.compiled_kernel(x.shape)
        runner = self._runner(compiled)
        runtime.use_threads(self.threads or runtime.default_threads())
        return [runtime.to_device(x, runner.device), *self._weights_on_device(compiled, runner),
                runtime.device_empty(compiled.workload.output_shape, self.compute_dtype, runner.device)]

    def _weights_on_device(self, compiled: kernel_build.CompiledKernel, runner) -> list:
        """The weights as `compiled` reads them, where `runner` runs it: in the compute dtype, the kernel
        packed into the schedule's blocks. Made once per weight change, layout and device."""
        # One read of each attribute: a concurrent set_weights replaces them, never edits them.
        cache, kernel, bias = self._device_weights, self._kernel, self._bias
        key = (compiled.kernel_block, runner.device)
        weights = cache.get(key)
        if weights is None:
            packed = pack_kernel(kernel.astype(self.compute_dtype), compiled.kernel_block)
            weights = cache[key] = runner.weights([packed] + ([] if bias is None else [bias.astype(self.compute_dtype)]))
        return weights

    def __call__(self, inputs):
        if isinstance(inputs, KerasTensor):
            return self._symbolic_call(inputs)
        x = to_array(inputs)
        if x.dtype.kind not in "biuf":
            raise TypeError(f"Input 0 of layer '{self.name}' must be a real numeric array (it is cast to "
                            f"{self.compute_dtype}). Received dtype={x.dtype}")
        self.compute_output_shape(x.shape)  # validates the shape, before anything compiles
        if self.activation in activations.UNCALLABLE:
            raise TypeError(f"The activation '{self.activation}' needs `threshold` and `default_value` "
                            "arguments: pass a callable such as lambda x: keras.activations.threshold(x, t, v).")
        if not self.built:
            self.build(x.shape)
        if x.shape[0] == 0:  # an empty batch has an empty answer; nothing to compile
            return np.empty(self.compute_output_shape(x.shape), dtype=self.compute_dtype)
        self._check_can_run()
        compiled = self.compiled_kernel(x.shape)
        runner = self._runner(compiled)
        y = self._outputs.take(compiled.workload.output_shape, np.dtype(self.compute_dtype))
        runtime.use_threads(self.threads or runtime.default_threads())
        runner(x.astype(self.compute_dtype, copy=False), self._weights_on_device(compiled, runner), y)
        if callable(self.activation):
            y = np.asarray(self.activation(y), dtype=self.compute_dtype)
        if self.activity_regularizer is not None:
            # Keras divides the activity penalty by the batch size.
            self._activity_losses = [float(self.activity_regularizer(y)) / x.shape[0]]
        return y

    def gradients(self, inputs, output_gradient, *, output=None, input_gradient=True) -> dict:
        """Gradients of a loss through this layer, given `output_gradient` = dL/dy for y = layer(inputs):
        {"input": dL/dx, "kernel": dL/dW (Keras's layout), "bias": dL/db or None}, computed by TVM
        kernels (tvmconv.backward) in the compute dtype. Regularizer terms are not included.

        A training loop that has y = layer(inputs) can pass it as `output`: for most activations
        (backward.FROM_OUTPUT) the derivative is then taken from y, and the pre-activation is not
        recomputed. `input_gradient=False` skips dL/dx ("input" is None), e.g. for a first layer."""
        x = to_array(inputs)
        if x.dtype.kind not in "biuf":
            raise TypeError(f"Input 0 of layer '{self.name}' must be a real numeric array. Received dtype={x.dtype}")
        output_shape = self.compute_output_shape(x.shape)
        dy = to_array(output_gradient)
        if dy.shape != tuple(output_shape):
            raise ValueError(f"`output_gradient` must have the layer's output shape {tuple(output_shape)} for an "
                             f"input of shape {x.shape}. Received shape {dy.shape}")
        if callable(self.activation) or self.activation in activations.UNCALLABLE:
            raise NotImplementedError(f"gradients need a named activation compiled into the kernel; layer "
                                      f"'{self.name}' has {activations.serialize(self.activation)!r}")
        if self.remote is not None or self.target.kind.name != "llvm":
            raise NotImplementedError("gradients run on this host's CPU only for now: layer "
                                      f"'{self.name}' has target={self.target.kind.name!r}, remote={self.remote!r}")
        self._check_can_run()
        if not self.built:
            self.build(x.shape)
        input_gradient = validation.as_bool(input_gradient, "input_gradient")
        if output is not None:
            output = to_array(output)
            if output.dtype.kind not in "biuf" or output.shape != dy.shape:
                raise ValueError(f"`output` must be the layer's output for these inputs: a real array of shape "
                                 f"{dy.shape}. Received shape {output.shape}, dtype={output.dtype}")
        dtype = self.compute_dtype
        x = np.ascontiguousarray(x, dtype=dtype)
        dy = np.ascontiguousarray(dy, dtype=dtype)
        wl = self.workload(x.shape)
        runtime.use_threads(self.threads or runtime.default_threads())
        dz = dy
        if wl.activation != "linear":
            from_output = output is not None and wl.activation in backward.FROM_OUTPUT
            if from_output:
                saved = np.ascontiguousarray(output, dtype=dtype)
            else:  # z = conv(x) + b, the pre-activation: the forward kernel with a linear epilogue
                linear = self._kernel_for(("pre-activation", x.shape),
                                          lambda: dataclasses.replace(wl, activation="linear"))
                saved = runtime.aligned_empty(linear.workload.output_shape, dtype)
                linear.kernel(x, self._weights_on_device(linear, linear.kernel), saved)
            dz = runtime.aligned_empty(saved.shape, dtype)
            self._gradient_kernel("activation-from-output" if from_output else "activation", wl, saved, dy, out=dz)
        dx = self._input_gradient(wl, dz) if input_gradient else None
        dw = self._kernel_gradient(wl, x, dz)
        db = dz.sum(axis=(0, 1, 2) if wl.channels_last else (0, 2, 3)) if wl.use_bias else None
        return {"input": dx, "kernel": dw, "bias": db}

    def _input_gradient(self, wl: ConvWorkload, dz: np.ndarray) -> np.ndarray:
        """dx by the forward kernels of `backward.input_gradient_phases` (tuned like any forward workload)."""
        phases, covered = backward.input_gradient_phases(wl)
        direct = covered and len(phases) == 1  # one phase writes all of dx: straight into it
        dx = runtime.aligned_empty(wl.input_shape, wl.dtype) if direct else np.zeros(wl.input_shape, wl.dtype)
        for i, phase in enumerate(phases):
            compiled = self._kernel_for(("input gradient", wl.input_shape, i), lambda phase=phase: phase.workload)
            # Made once per weight change, like the forward weights (the cache is emptied on assignment).
            key = ("transposed", i, compiled.kernel_block)
            if key not in self._device_weights:
                transposed = phase.kernel(self._kernel.astype(wl.dtype), wl.groups)
                self._device_weights[key] = compiled.kernel.weights(
                    [pack_kernel(np.ascontiguousarray(transposed), compiled.kernel_block)])
            out = dx if direct else runtime.aligned_empty(compiled.workload.output_shape, wl.dtype)
            compiled.kernel(phase.output_gradient(dz), self._device_weights[key], out)
            if not direct:
                phase.place(dx, out)
        return dx

    def _gradient_kernel(self, part: str, wl: ConvWorkload, *inputs, out: np.ndarray) -> None:
        """Run the gradient kernel `part` (build.GRADIENT_KERNELS) of `wl`, kept per layer. Its inputs are
        read in place (declared unaligned, as the forward kernel's x)."""
        key = ("gradient", part, wl)
        if key not in self._kernels:
            self._kernels[key] = kernel_build.get_gradient_kernel(part, wl, self.target)
        self._kernels[key].function(*[runtime.input_tensor(a) for a in inputs], runtime.to_tensor(out))

    def _kernel_gradient(self, wl: ConvWorkload, x: np.ndarray, dz: np.ndarray) -> np.ndarray:
        """dW by the forward kernel of `backward.kernel_gradient_workload`:
        dW[i, j, c, f] = Σ_{n, oh, ow} x_pad[n, oh·s + i·d, ow·s + j·d, g·cg + c] · dz[n, oh, ow, f];
        for depthwise and channels-last 1x1 layers by their own kernels, which read x and dz channels-last."""
        route = backward.kernel_gradient_route(wl)
        if route in ("depthwise", "pointwise"):
            dw = runtime.aligned_empty(wl.kernel_shape, wl.dtype)
            if not wl.channels_last:
                x, dz = x.transpose(0, 2, 3, 1), dz.transpose(0, 2, 3, 1)
            if route == "pointwise":
                x = backward.pointwise_pixels(wl, x)
            self._gradient_kernel(f"{route}-kernel", wl, x, dz, out=dw)
            return dw
        compiled = self._kernel_for(("kernel gradient", x.shape), lambda: backward.kernel_gradient_workload(wl))
        image, weights = backward.kernel_gradient_operands(wl, x, dz)
        if image is None:  # "samples as channels": x padded and regrouped by a TVM kernel
            image = runtime.aligned_empty(compiled.workload.input_shape, wl.dtype)
            self._gradient_kernel("kernel-gradient-image", wl, x, out=image)
        out = runtime.aligned_empty(compiled.workload.output_shape, wl.dtype)
        packed = pack_kernel(np.ascontiguousarray(weights), compiled.kernel_block)
        compiled.kernel(image, compiled.kernel.weights([packed]), out)  # x is read in place, or copied once
        return backward.kernel_gradient_from_output(wl, out)

    def _symbolic_call(self, inputs: KerasTensor) -> KerasTensor:
        self._check_input_shape(inputs.shape)
        if not self.built:
            self.build(inputs.shape)
        return KerasTensor(self.compute_output_shape(inputs.shape), self.compute_dtype, producer=self,
                           parent=inputs, name=self.name)

    # ------------------------------------------------------------ config

    def get_config(self) -> dict:
        config = {
            "name": self.name, "trainable": self.trainable,
            "dtype": "mixed_float16" if self.compute_dtype != self.dtype else self.dtype,
            "filters": self.filters, "kernel_size": self.kernel_size, "strides": self.strides,
            "padding": self.padding, "data_format": self.data_format, "dilation_rate": self.dilation_rate,
            "groups": self.groups, "activation": activations.serialize(self.activation), "use_bias": self.use_bias,
            "kernel_initializer": initializers.serialize(self.kernel_initializer),
            "bias_initializer": initializers.serialize(self.bias_initializer),
            "kernel_regularizer": regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": regularizers.serialize(self.bias_regularizer),
            "activity_regularizer": regularizers.serialize(self.activity_regularizer),
            "kernel_constraint": constraints.serialize(self.kernel_constraint),
            "bias_constraint": constraints.serialize(self.bias_constraint),
        }
        if self._target_given is not None:
            config["target"] = self._target_given
        if self.threads is not None:
            config["threads"] = self.threads
        if isinstance(self.remote, (str, dict)):  # a live session is not configuration
            config["remote"] = self.remote
        return config

    @classmethod
    def from_config(cls, config: dict) -> "Conv2D":
        return cls(**config)

    def __repr__(self):
        return f"<Conv2D name={self.name}, filters={self.filters}, kernel_size={self.kernel_size}, built={self.built}>"
