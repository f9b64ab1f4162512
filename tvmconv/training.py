"""Keras-style training for tvmconv models: losses, optimizers (Keras 3's update rules), and the step.

One step: the forward pass, layer by layer, keeping each call's input; the loss and the
regularizer terms; then backwards, each layer's `gradients` (TVM kernels) turning the gradient of
its output into those of its input and weights; the regularizers' gradients added; the optimizer's
update; the constraints applied. Layers with `trainable=False` pass gradients through unchanged
weights. The weights change once per step, so packed kernel layouts are rebuilt once per step.
"""
import dataclasses
import math

import numpy as np
from tqdm.auto import tqdm

from .keras import validation

# ---------------------------------------------------------------- losses: (loss, d loss / d y_pred)


def _mse(y_true, y_pred):
    diff = y_pred - y_true
    return float(np.mean(np.square(diff, dtype=np.float64))), 2 * diff / diff.size


def _mae(y_true, y_pred):
    diff = y_pred - y_true
    return float(np.mean(np.abs(diff), dtype=np.float64)), np.sign(diff) / diff.size


def _huber(y_true, y_pred, delta=1.0):
    diff = y_pred - y_true
    small = np.abs(diff) <= delta
    loss = np.where(small, 0.5 * np.square(diff), delta * np.abs(diff) - 0.5 * delta ** 2)
    return float(np.mean(loss, dtype=np.float64)), np.where(small, diff, delta * np.sign(diff)) / diff.size


LOSSES = {"mse": _mse, "mean_squared_error": _mse, "mae": _mae, "mean_absolute_error": _mae, "huber": _huber}


def _jax(what: str):
    """jax and jax.numpy, which differentiate user callables (`what`), or a ValueError saying how to do without."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        raise ValueError(f"{what} is differentiated with JAX, which is not installed: pip install jax") from None
    return jax, jnp


def _callable_loss(function):
    """A user's loss(y_true, y_pred), differentiated with JAX (Keras losses on the JAX backend qualify)."""
    jax, jnp = _jax("a callable `loss` (else use loss='mse', 'mae' or 'huber')")

    def scalar(y_true, y_pred):
        return jnp.mean(function(y_true, y_pred))

    value_and_grad = jax.value_and_grad(scalar, argnums=1)

    def loss(y_true, y_pred):
        value, grad = value_and_grad(jnp.asarray(y_true), jnp.asarray(y_pred))
        return float(value), np.asarray(grad, dtype=y_pred.dtype)
    return loss


def penalty_gradient(regularizer, value: np.ndarray) -> np.ndarray:
    """d(penalty)/d(value): a tvmconv regularizer's own `gradient`, else JAX's derivative of a callable one
    (written with jax.numpy or keras.ops on the JAX backend)."""
    if hasattr(regularizer, "gradient"):
        return regularizer.gradient(value)
    jax, jnp = _jax(f"the callable regularizer {regularizer!r}")
    try:
        grad = jax.grad(lambda v: jnp.sum(regularizer(v)))(jnp.asarray(value))
    except TypeError as error:  # numpy code cannot be traced: JAX raises a TypeError (TracerArrayConversionError)
        raise ValueError(f"could not differentiate the callable regularizer {regularizer!r} with JAX ({error}). "
                         "Write it with jax.numpy or keras.ops, or give it a gradient(x) method") from None
    return np.asarray(grad, dtype=value.dtype)


def get_loss(identifier):
    if isinstance(identifier, str):
        if identifier not in LOSSES:
            raise ValueError(f"Could not interpret loss identifier: {identifier!r} (argument `loss`). "
                             f"Allowed: {', '.join(sorted(LOSSES))}, or a callable loss(y_true, y_pred).")
        return LOSSES[identifier]
    if callable(identifier):
        return _callable_loss(identifier)
    raise ValueError(f"Could not interpret loss identifier: {identifier!r} (argument `loss`).")


# ---------------------------------------------------------------- optimizers (Keras 3's update rules)


class Optimizer:
    def __init__(self, learning_rate):
        self.learning_rate = validation.positive_float(learning_rate, "learning_rate")
        self.iterations = 0
        self._slots: dict[tuple, dict] = {}

    def apply(self, weights_and_grads) -> list:
        """New values for [(key, weight, gradient), ...]; one step."""
        self.iterations += 1
        return [self._update(w, g, self._slots.setdefault(key, {})) for key, w, g in weights_and_grads]

    def _update(self, w, g, slots):
        raise NotImplementedError


class SGD(Optimizer):
    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False):
        super().__init__(learning_rate)
        self.momentum = validation.fraction(momentum, "momentum")
        self.nesterov = validation.as_bool(nesterov, "nesterov")

    def _update(self, w, g, slots):
        if not self.momentum:
            return w - self.learning_rate * g
        velocity = slots["velocity"] = self.momentum * slots.get("velocity", np.zeros_like(w)) - self.learning_rate * g
        if self.nesterov:
            return w + self.momentum * velocity - self.learning_rate * g
        return w + velocity


class Adam(Optimizer):
    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        super().__init__(learning_rate)
        self.beta_1, self.beta_2 = validation.fraction(beta_1, "beta_1"), validation.fraction(beta_2, "beta_2")
        self.epsilon = validation.positive_float(epsilon, "epsilon")

    def _update(self, w, g, slots):
        t = self.iterations
        m = slots["m"] = self.beta_1 * slots.get("m", np.zeros_like(w)) + (1 - self.beta_1) * g
        v = slots["v"] = self.beta_2 * slots.get("v", np.zeros_like(w)) + (1 - self.beta_2) * np.square(g)
        rate = self.learning_rate * math.sqrt(1 - self.beta_2 ** t) / (1 - self.beta_1 ** t)
        return w - rate * m / (np.sqrt(v) + self.epsilon)


class RMSprop(Optimizer):
    def __init__(self, learning_rate=0.001, rho=0.9, momentum=0.0, epsilon=1e-7, centered=False):
        super().__init__(learning_rate)
        self.rho, self.momentum = validation.fraction(rho, "rho"), validation.fraction(momentum, "momentum")
        self.epsilon = validation.positive_float(epsilon, "epsilon")
        self.centered = validation.as_bool(centered, "centered")

    def _update(self, w, g, slots):
        velocity = slots["velocity"] = self.rho * slots.get("velocity", np.zeros_like(w)) + (1 - self.rho) * np.square(g)
        denominator = velocity
        if self.centered:
            average = slots["average"] = self.rho * slots.get("average", np.zeros_like(w)) + (1 - self.rho) * g
            denominator = velocity - np.square(average)
        increment = self.learning_rate * g / np.sqrt(denominator + self.epsilon)
        if self.momentum:
            slots["momentum"] = self.momentum * slots.get("momentum", np.zeros_like(w)) + increment
            return w - slots["momentum"]
        return w - increment


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "rmsprop": RMSprop}


def get_optimizer(identifier) -> Optimizer:
    if isinstance(identifier, Optimizer):
        return identifier
    if isinstance(identifier, str) and identifier.lower() in OPTIMIZERS:
        return OPTIMIZERS[identifier.lower()]()
    raise ValueError(f"Could not interpret optimizer identifier: {identifier!r} (argument `optimizer`). Allowed: "
                     f"{', '.join(OPTIMIZERS)} or an optimizer object (tvmconv.training.SGD, Adam, RMSprop).")


# ---------------------------------------------------------------- one step


def forward(calls, x):
    """Every call's output, in order, for a list of model.LayerCall-like (layer, source) pairs."""
    outputs = []
    for layer, source in calls:
        outputs.append(layer(x if source < 0 else outputs[source]))
    return outputs


def regularization(calls) -> float:
    return sum(sum(layer.losses) for layer in {id(layer): layer for layer, _ in calls}.values())


@dataclasses.dataclass(frozen=True)
class OutputLoss:
    """The loss on one of the model's outputs: the call that gives it, its name for History, the loss
    function and its weight in the total (Keras's `loss_weights`)."""
    call: int
    name: str
    loss: object
    weight: float = 1.0


def step(calls, losses: list[OutputLoss], x, ys: list, optimizer: Optimizer | None) -> tuple[float, list[float]]:
    """(total loss with regularizers, each output's loss) of one batch, and with an optimizer one update of
    the weights. `ys` holds one target per entry of `losses`."""
    outputs = forward(calls, x)
    output_grads = [None] * len(outputs)
    each = []
    for output, y in zip(losses, ys, strict=True):
        value, grad = output.loss(y, outputs[output.call])
        each.append(value)
        grad = (output.weight * grad).astype(outputs[output.call].dtype)
        previous = output_grads[output.call]
        output_grads[output.call] = grad if previous is None else previous + grad
    loss = sum(output.weight * value for output, value in zip(losses, each, strict=True)) + regularization(calls)
    if optimizer is None:
        return loss, each
    updates = []
    for i in reversed(range(len(calls))):
        layer, source = calls[i]
        dy = output_grads[i]
        if dy is None:
            continue
        if layer.activity_regularizer is not None:  # its penalty is divided by the batch size, as Keras
            dy = dy + penalty_gradient(layer.activity_regularizer, outputs[i]) / x.shape[0]
        layer_input = x if source < 0 else outputs[source]
        # The output saves recomputing the pre-activation; the model's input needs no gradient.
        grads = layer.gradients(layer_input, dy, output=outputs[i], input_gradient=source >= 0)
        if source >= 0:
            output_grads[source] = grads["input"] if output_grads[source] is None else output_grads[source] + grads["input"]
        if layer.trainable:
            kernel_grad = grads["kernel"]
            if layer.kernel_regularizer is not None:
                kernel_grad = kernel_grad + penalty_gradient(layer.kernel_regularizer, layer.kernel)
            updates.append((layer, 0, layer.kernel, kernel_grad))
            if layer.use_bias:
                bias_grad = grads["bias"]
                if layer.bias_regularizer is not None:
                    bias_grad = bias_grad + penalty_gradient(layer.bias_regularizer, layer.bias)
                updates.append((layer, 1, layer.bias, bias_grad))
    new_values = optimizer.apply([((id(layer), slot), w, g) for layer, slot, w, g in updates])
    assigned: dict[int, list] = {}
    for (layer, slot, _, _), value in zip(updates, new_values, strict=True):
        constraint = layer.kernel_constraint if slot == 0 else layer.bias_constraint
        value = (constraint(value) if constraint is not None else value).astype(layer.compute_dtype)
        assigned.setdefault(id(layer), [layer, list(layer.get_weights())])[1][slot] = value
    for layer, weights in assigned.values():
        layer.set_weights(weights)  # once per step: the packed kernel layouts are rebuilt once
    return loss, each


class History:
    """What `fit` returns, as Keras's: `history` maps "loss" (and "val_loss") to per-epoch values."""

    def __init__(self):
        self.history: dict[str, list[float]] = {}
        self.epoch: list[int] = []


def batches(n: int, batch_size: int, shuffle: bool, rng):
    order = rng.permutation(n) if shuffle else np.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def fit(calls, losses: list[OutputLoss], x, ys: list, optimizer, epochs, batch_size, validation_data, shuffle,
        verbose, evaluate) -> History:
    """Keras's fit loop. History: "loss" (the total), and with several outputs "<name>_loss" for each;
    with `validation_data`, the same prefixed "val_" from `evaluate(x_val, y_val)`."""
    history, rng = History(), np.random.default_rng()
    names = ["loss", *(f"{output.name}_loss" for output in losses)] if len(losses) > 1 else ["loss"]
    for epoch in range(epochs):
        parts = batches(len(x), batch_size, shuffle, rng)
        bar = tqdm(parts, desc=f"Epoch {epoch + 1}/{epochs}", unit="batch", disable=not verbose, leave=True)
        totals = np.zeros(len(names))
        for index in bar:
            loss, each = step(calls, losses, x[index], [y[index] for y in ys], optimizer)
            totals += np.array([loss, *each][:len(names)]) * len(index)
            bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        history.epoch.append(epoch)
        for name, total in zip(names, totals, strict=True):
            history.history.setdefault(name, []).append(float(total) / len(x))
        if validation_data is not None:
            for name, value in zip(names, evaluate(*validation_data), strict=True):
                history.history.setdefault(f"val_{name}", []).append(value)
        if verbose:
            text = " - ".join(f"{name}: {values[-1]:.4g}" for name, values in history.history.items())
            tqdm.write(f"Epoch {epoch + 1}/{epochs} - {text}")
    return history
