"""Per-layer execution: compiled kernels, the weights packed where they run, output buffers, the runner
(this CPU, its GPU, or a board over RPC), the forward step and the gradients.

An Engine takes workloads (tvmconv.compute) and arrays, never the layer. tvmconv.layer's Conv2D keeps
one: it validates each call at the API's edge, hands the engine its weights when they change, and
each call's workload and input. Kernels come from tvmconv.build (memory, then disk, then compiled),
once per workload and engine.
"""
import dataclasses

import numpy as np

from . import backward, build, rpc_devices, runtime, targets
from .compute import ConvWorkload


class Engine:
    """Runs the convolutions of one layer. `owner` names the layer in error messages."""

    def __init__(self, target, threads: int | None, remote_device, owner: str):
        self.target, self.threads, self.remote, self.owner = target, threads, remote_device, owner
        self._weights: tuple = (None, None)  # the convolution's weights (Keras's layout) and bias
        self._packed: dict[tuple, list] = {}  # weights as kernels read them, by (use, layout, device)
        self._kernels: dict[object, build.CompiledKernel] = {}  # by workload
        self._forward: dict[ConvWorkload, object] = {}  # the forward step by workload, local runs (_forward_call)
        self._outputs = runtime.OutputPool()
        self._checked = False

    def set_weights(self, weights: np.ndarray, bias: np.ndarray | None) -> None:
        """New weights (treated as read-only). The packed copies are remade on their next use; each cache is
        replaced, not cleared, so a call running meanwhile keeps a consistent set."""
        self._weights = (weights, bias)
        self._packed, self._forward = {}, {}

    # ------------------------------------------------------------ kernels

    def kernel(self, workload) -> build.CompiledKernel:
        """The compiled kernel of a workload (a convolution or a gradient kernel), fetched once. (Also for
        a target this host cannot run: a cross-compiled kernel can be inspected or exported.)"""
        compiled = self._kernels.get(workload)
        if compiled is None:
            compiled = self._kernels[workload] = build.get_kernel(workload, self.target)
        return compiled

    def _check_runnable(self) -> None:
        """Refuse, before compiling anything, what could not run: clear errors, not a crash. Checked once:
        the checks cost ~0.5 ms, and target and remote never change."""
        if self._checked:
            return
        if self.target.kind.name == "cuda" and self.remote is not None:
            raise NotImplementedError(f"layer '{self.owner}': CUDA kernels run on this machine's GPU, not over RPC "
                                      f"(remote={self.remote!r}); export them to run on another machine")
        if self.remote is None:
            targets.check_runnable_here(self.target)
        self._checked = True

    def _runner(self, compiled: build.CompiledKernel):
        """What runs `compiled`: its module here, or its library uploaded to the remote board (whose session
        may have been renewed since the last call)."""
        if self.remote is None:
            return compiled.kernel
        return rpc_devices.remote_kernel(rpc_devices.connect(self.remote), compiled.library)

    def _device_weights(self, use, layout: tuple, runner, make) -> list:
        """Weights as a kernel reads them where `runner` runs it: made by `make()` once per weight change,
        use (forward, a dx phase, ...), packed layout and device."""
        cache = self._packed
        key = (use, layout, runner.device)
        weights = cache.get(key)
        if weights is None:
            weights = cache[key] = runner.weights(make())
        return weights

    def _forward_weights(self, wl: ConvWorkload, compiled: build.CompiledKernel, runner) -> list:
        weights, bias = self._weights

        def packed():
            return [compiled.pack(weights.astype(wl.dtype))] + (
                [] if bias is None else [bias.astype(wl.dtype)])
        return self._device_weights("forward", compiled.layout, runner, packed)

    def _prepared(self, wl: ConvWorkload) -> tuple:
        """(runner, its weights) for a forward call of `wl`."""
        self._check_runnable()
        compiled = self.kernel(wl)
        runner = self._runner(compiled)
        return runner, self._forward_weights(wl, compiled, runner)

    # ------------------------------------------------------------ forward

    def forward_step(self, wl: ConvWorkload):
        """`wl`'s forward step: a function of x (in the workload's shape, any real dtype: cast to the compute
        dtype) that returns the layer's output; for x on the GPU (a runtime.GpuTensor, read in place, in the
        compute dtype), a tensor of x's library there. Valid until the next set_weights; over RPC, for one call."""
        return self._forward.get(wl) or self._forward_call(wl)

    def _forward_call(self, wl: ConvWorkload):
        """`wl`'s forward step as one function of x, its kernel and weights bound: made once per workload and
        weight change (over RPC, for every call: the board's session may have been renewed). Each Python step
        between two kernels costs 0.05-0.15 µs, and MobileNetV2's smallest run in 6-10 µs."""
        runner, weights = self._prepared(wl)
        output_shape, dtype, threads, take, output_for = (wl.output_shape, wl.dtype, self.threads,
                                                          self._outputs.take, runner.output_for)
        compute_dtype = np.dtype(dtype)

        def call(x):
            if type(x) is runtime.GpuTensor:
                return x.like_source(runner.on_device(x.tensor, weights, output_shape))
            y, out = take(output_shape, dtype, output_for)
            # (numpy's dtypes of native byte order are singletons: `is` spares astype's 0.1 µs for the usual x)
            runner(x if x.dtype is compute_dtype else x.astype(compute_dtype), weights, out, threads)
            return y
        if self.remote is None:
            self._forward[wl] = call
        return call

    def kernel_arguments(self, wl: ConvWorkload, x: np.ndarray) -> list:
        """The forward kernel's arguments for one call (input, weights as the kernel reads them, a fresh
        output), for timing the bare kernel with `kernel(wl).time_evaluator()`. On the CPU the input is x
        itself, as a call reads it: an aligned copy timed a different kernel run (numpy's large arrays
        start 16 bytes into a 64-byte line, and every vector load then spans two lines: 20-25% slower
        on MobileNetV2's largest depthwise layers, measured)."""
        if self.remote is not None:
            raise ValueError(f"kernel_arguments are for timing kernels in this process; layer '{self.owner}' "
                             f"runs on remote={self.remote!r}")
        runner, weights = self._prepared(wl)
        runtime.use_threads(self.threads)
        x = x.astype(wl.dtype, copy=False)
        return [runtime.input_tensor(x) if runner.device == "cpu" else runtime.to_device(x, runner.device), *weights,
                runtime.device_empty(wl.output_shape, wl.dtype, runner.device)]

    # ------------------------------------------------------------ gradients (tvmconv.backward)

    def gradients(self, wl: ConvWorkload, x: np.ndarray, dy: np.ndarray, output: np.ndarray | None,
                  input_gradient: bool) -> dict:
        """{"input": dL/dx or None, "kernel": dL/dW (Keras's layout), "bias": dL/db or None} for dy = dL/dy,
        all in the compute dtype; `output`, the layer's output for x, saves recomputing the pre-activation."""
        if self.remote is not None:
            raise NotImplementedError("gradients run on this host's CPU or GPU, not over RPC: layer "
                                      f"'{self.owner}' has remote={self.remote!r}")
        self._check_runnable()
        dtype = wl.dtype
        x = np.ascontiguousarray(x, dtype=dtype)
        dy = np.ascontiguousarray(dy, dtype=dtype)
        runtime.use_threads(self.threads)
        dz = dy if wl.activation == "linear" else self._activation_gradient(wl, x, dy, output)
        dx = self._input_gradient(wl, dz) if input_gradient else None
        dw = self._weight_gradient(wl, x, dz)
        db = dz.sum(axis=(0, 1, 2) if wl.channels_last else (0, 2, 3)) if wl.use_bias else None
        return {"input": dx, "kernel": dw, "bias": db}

    def _run(self, kernel, *inputs, out: np.ndarray) -> None:
        """Run a gradient kernel that is not a convolution (on the CPU its inputs are read in place: they are
        declared unaligned, as the forward kernel's x)."""
        self.kernel(kernel).kernel.call(*inputs, out=out)

    def _activation_gradient(self, wl: ConvWorkload, x, dy, output) -> np.ndarray:
        """dz = dy · act'(z), from the output where that is exact (backward.FROM_OUTPUT), else from the
        pre-activation z = conv(x) + b, the forward kernel with a linear epilogue."""
        from_output = output is not None and wl.activation in backward.FROM_OUTPUT
        if from_output:
            saved = np.ascontiguousarray(output, dtype=wl.dtype)
        else:
            linear = dataclasses.replace(wl, activation="linear")
            saved = runtime.aligned_empty(linear.output_shape, wl.dtype)
            runner, weights = self._prepared(linear)
            runner(x, weights, saved, self.threads)
        dz = runtime.aligned_empty(saved.shape, wl.dtype)
        self._run(backward.activation_gradient(wl, from_output), saved, dy, out=dz)
        return dz

    def _input_gradient(self, wl: ConvWorkload, dz: np.ndarray) -> np.ndarray:
        """dx by the forward kernels of `backward.input_gradient_phases` (tuned like any forward workload)."""
        phases, covered = backward.input_gradient_phases(wl)
        direct = covered and len(phases) == 1  # one phase writes all of dx: straight into it
        dx = runtime.aligned_empty(wl.input_shape, wl.dtype) if direct else np.zeros(wl.input_shape, wl.dtype)
        weights = self._weights[0]
        for i, phase in enumerate(phases):
            compiled = self.kernel(phase.workload)

            def transposed(phase=phase, compiled=compiled):
                return [compiled.pack(np.ascontiguousarray(phase.weights(weights.astype(wl.dtype), wl.groups)))]
            phase_weights = self._device_weights(("dx phase", i), compiled.layout, compiled.kernel, transposed)
            out = dx if direct else runtime.aligned_empty(phase.workload.output_shape, wl.dtype)
            compiled.kernel(phase.output_gradient(dz), phase_weights, out, self.threads)
            if not direct:
                phase.place(dx, out)
        return dx

    def _weight_gradient(self, wl: ConvWorkload, x: np.ndarray, dz: np.ndarray) -> np.ndarray:
        """dW as `backward.weight_gradient_route` says: by a kernel of its own for depthwise and channels-last
        1x1 layers (which read x and dz channels-last), else by the forward kernel of
        `backward.weight_gradient_workload`, dz as its weights."""
        route = backward.weight_gradient_route(wl)
        if route in ("depthwise", "pointwise"):
            dw = runtime.aligned_empty(wl.weights_shape, wl.dtype)
            if not wl.channels_last:
                x, dz = x.transpose(0, 2, 3, 1), dz.transpose(0, 2, 3, 1)
            if route == "pointwise":
                self._run(backward.PointwiseWeightGradient(wl), backward.pointwise_pixels(wl, x), dz, out=dw)
            else:
                self._run(backward.DepthwiseWeightGradient(wl), x, dz, out=dw)
            return dw
        compiled = self.kernel(backward.weight_gradient_workload(wl))
        image, weights = backward.weight_gradient_operands(wl, x, dz)
        if image is None:  # "samples as channels": x padded and regrouped by a TVM kernel
            image = runtime.aligned_empty(compiled.workload.input_shape, wl.dtype)
            self._run(backward.WeightGradientImage(wl), x, out=image)
        out = runtime.aligned_empty(compiled.workload.output_shape, wl.dtype)
        packed = compiled.pack(np.ascontiguousarray(weights))
        compiled.kernel(image, compiled.kernel.weights([packed]), out, self.threads)  # x in place, or copied once
        return backward.weight_gradient_from_output(wl, out)
