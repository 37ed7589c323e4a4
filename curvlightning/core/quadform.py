r"""Exact quadratic forms ``v^T H v`` of sequential networks by second-order tangents.

Hutchinson's trace estimator needs only ``v^T H v``, not ``H v``. For a network
``z = f(theta; x)`` and a loss ``L = (1/N) sum_n l(z_n)``, the second derivative of
``t -> L(theta + t v)`` at 0 is

.. math::
    v^\top H v = \frac{1}{N} \sum_n \left( \dot z_n^\top \nabla_z^2 l \, \dot z_n
        + \nabla_z l^\top \ddot z_n \right),

with ``dz = J v`` and ``ddz`` the second directional derivative of the outputs. Both
come from one forward sweep of two tangent streams: for a linear layer
``a = W h + b`` with probe parts ``(V, c)``,

.. math::
    \dot a = W \dot h + V h + c, \qquad \ddot a = W \ddot h + 2 V \dot h,

and for an elementwise activation ``h = sigma(a)``,
``dh = sigma'(a) da`` and ``ddh = sigma'(a) dda + sigma''(a) da^2``. The primal sweep
is shared by all probes, so a probe costs the tangent products only: about 1.3
gradients on an MLP against about 1.8 for a Hessian-vector product, which computes
the whole vector ``H v`` where the trace needs one number.

Supported: ``nn.Sequential`` of ``nn.Linear`` (2-D inputs), ``nn.ReLU``, ``nn.Tanh``,
``nn.Sigmoid``, ``nn.Identity`` and ``nn.Flatten``, with the categorical or Gaussian
likelihood (cross-entropy or mean squared error, ``reduction="mean"``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from curvlightning.core.estimators import Estimate, check_num_probes, mean_and_stderr
from curvlightning.core.functional import (
    FunctionalModel,
    trainable_parameters,
    unflatten,
)
from curvlightning.core.likelihoods import Likelihood
from curvlightning.core.probes import ProbeSource

__all__ = ["SequentialQuadraticForm", "quadratic_form_trace", "sequential_network"]

_Activation = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _relu(a: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    return (a > 0).to(a.dtype), torch.zeros_like(a)


def _tanh(a: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    d1 = 1 - h * h
    return d1, -2 * h * d1


def _sigmoid(a: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    d1 = h * (1 - h)
    return d1, d1 * (1 - 2 * h)


_ACTIVATIONS: dict[type, _Activation] = {
    nn.ReLU: _relu,
    nn.Tanh: _tanh,
    nn.Sigmoid: _sigmoid,
}


class SequentialQuadraticForm:
    """``v -> v^T H v`` for an ``nn.Sequential`` network on one batch, exactly.

    The primal activations and the derivatives of the activations are computed once
    at construction; each call runs the two tangent streams.

    Args:
        net: The network; its trainable parameters are all the Linear layers'.
        inputs: Inputs of shape ``(N, d)``.
        targets: Targets of the likelihood.
        likelihood: ``"categorical"`` or ``"gaussian"``.

    Raises:
        TypeError: Naming the first unsupported layer.
        ValueError: For another likelihood or frozen Linear parameters.
    """

    def __init__(
        self,
        net: nn.Sequential,
        inputs: Tensor,
        targets: Tensor,
        likelihood: Likelihood,
    ) -> None:
        if likelihood.name not in ("categorical", "gaussian"):
            raise ValueError(
                "SequentialQuadraticForm supports the 'categorical' and 'gaussian' "
                f"likelihoods, got {likelihood.name!r}; use a Hessian-vector product"
            )
        self.layers = _check_layers(net)
        self.names, self.params = trainable_parameters(net)
        self.num_matvecs = 0
        with torch.no_grad():
            self._primal(inputs.to(self.params[0].dtype))
            self._loss_derivatives(likelihood, targets)

    @property
    def dim(self) -> int:
        """The number p of parameters."""
        return sum(p.numel() for p in self.params)

    def _primal(self, x: Tensor) -> None:
        """Each Linear layer's input, and each activation's two derivatives."""
        self._inputs: list[Tensor] = []
        self._derivs: list[tuple[Tensor, Tensor] | None] = []
        h = x.flatten(1)
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                self._inputs.append(h)
                h = layer(h)
                self._derivs.append(None)
            elif type(layer) in _ACTIVATIONS:
                a, h = h, layer(h)
                self._derivs.append(_ACTIVATIONS[type(layer)](a, h))
            else:
                self._derivs.append(None)
        self._outputs = h

    def _loss_derivatives(self, likelihood: Likelihood, targets: Tensor) -> None:
        z, n = self._outputs, self._outputs.shape[0]
        if likelihood.name == "categorical":
            self._probs = torch.softmax(z, dim=-1)
            grad = self._probs.clone()
            grad[torch.arange(n), targets] -= 1
        else:
            k = z.shape[1]
            grad = 2 * (z - targets.to(z.dtype)) / k
            self._probs = None
            self._scale = 2.0 / k
        self._grad = grad / n
        self._n = n

    def __call__(self, vector: Tensor) -> Tensor:
        """``v^T H v`` for ``v`` of shape ``(p,)`` (a scalar tensor)."""
        self.num_matvecs += 1
        pieces = iter(unflatten(vector.to(self.params[0].dtype), self.params))
        dh = ddh = None
        linear = 0
        with torch.no_grad():
            for layer, derivs in zip(self.layers, self._derivs, strict=True):
                if isinstance(layer, nn.Linear):
                    dh, ddh = _linear_tangents(
                        layer, self._inputs[linear], pieces, dh, ddh
                    )
                    linear += 1
                elif derivs is not None:
                    d1, d2 = derivs
                    ddh = d2 * dh * dh if ddh is None else d1 * ddh + d2 * dh * dh
                    dh = d1 * dh
            return self._form(dh, ddh)

    def _form(self, dz: Tensor, ddz: Tensor | None) -> Tensor:
        if self._probs is None:
            curvature = self._scale * (dz * dz).sum() / self._n
        else:
            p = self._probs
            curvature = ((p * dz * dz).sum() - ((p * dz).sum(-1) ** 2).sum()) / self._n
        if ddz is None:
            return curvature
        return curvature + (self._grad * ddz).sum()


def _linear_tangents(
    layer: nn.Linear,
    h: Tensor,
    pieces: object,
    dh: Tensor | None,
    ddh: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """The tangents of ``a = W h + b`` given the probe's parts for W and b."""
    v_weight = next(pieces)
    v_bias = next(pieces) if layer.bias is not None else None
    da = h @ v_weight.T
    if v_bias is not None:
        da = da + v_bias
    if dh is not None:
        da = da + dh @ layer.weight.T
    dda = None
    if dh is not None:
        dda = 2 * (dh @ v_weight.T)
        if ddh is not None:
            dda = dda + ddh @ layer.weight.T
    return da, dda


def _check_layers(net: nn.Module) -> list[nn.Module]:
    if not isinstance(net, nn.Sequential):
        raise TypeError(
            f"SequentialQuadraticForm needs an nn.Sequential, got {type(net).__name__}"
        )
    allowed = (nn.Linear, nn.Identity, nn.Flatten, *_ACTIVATIONS)
    for layer in net:
        if not isinstance(layer, allowed):
            raise TypeError(
                f"SequentialQuadraticForm does not support {type(layer).__name__}; "
                "use HessianOperator for this network"
            )
        if isinstance(layer, nn.Linear) and not all(
            p.requires_grad for p in layer.parameters()
        ):
            raise ValueError(
                "SequentialQuadraticForm needs every Linear parameter trainable; "
                "use HessianOperator for a network with frozen layers"
            )
    return list(net)


def sequential_network(model: FunctionalModel, inputs: Tensor) -> nn.Sequential:
    """The ``nn.Sequential`` that computes a functional model's outputs by itself.

    It must hold every trainable parameter, and its outputs on ``inputs`` must equal
    the model's (checked), so that forms of it are forms of the model's loss.

    Raises:
        ValueError: Naming what does not hold.
    """
    nets = [m for m in model.module.modules() if isinstance(m, nn.Sequential)]
    owned = {id(p) for p in model.module.parameters() if p.requires_grad}
    x = model.cast(inputs)
    for net in nets:
        held = {id(p) for p in net.parameters() if p.requires_grad}
        if held != owned or not _same_dtype(net, model):
            continue
        with torch.no_grad():
            expected = model.outputs(model.params, x)
            got = net(x.flatten(1))
        if got.shape == expected.shape and torch.allclose(
            got, expected, rtol=1e-5, atol=1e-6
        ):
            return net
    raise ValueError(
        "estimator='quadratic_form' needs the module's outputs to be those of one "
        "nn.Sequential holding every trainable parameter (Linear layers with ReLU, "
        f"Tanh or Sigmoid) in the pass' dtype {model.dtype}; "
        f"{type(model.module).__name__} has none: use estimator='hutchinson'"
    )


def _same_dtype(net: nn.Module, model: FunctionalModel) -> bool:
    return all(p.dtype == model.dtype for p in net.parameters())


def quadratic_form_trace(
    net: nn.Sequential,
    inputs: Tensor,
    targets: Tensor,
    likelihood: Likelihood,
    probes: ProbeSource,
    num_probes: int,
    *,
    reduce_samples: Callable[[Tensor], Tensor] | None = None,
) -> Estimate:
    r"""Hutchinson's trace estimate ``(1/n) sum_i v_i^T H v_i`` from exact forms.

    The same estimate as :func:`~curvlightning.core.estimators.hutchinson_trace`
    with the same probes, at the cost of the tangent sweeps only.

    Args:
        net: The network (see :class:`SequentialQuadraticForm`).
        inputs: Inputs ``(N, d)``.
        targets: Targets of the likelihood.
        likelihood: ``"categorical"`` or ``"gaussian"``.
        probes: The probe source.
        num_probes: Number of probes, at least 1.
        reduce_samples: Applied to the ``(n,)`` per-probe forms before the
            statistics (a weighted mean over ranks when all ranks share probes).

    Returns:
        The estimate, its standard error and the number of forms computed.

    Warning:
        No per-layer parts: a layer's trace needs the probe restricted to it.
    """
    check_num_probes(num_probes)
    form = SequentialQuadraticForm(net, inputs, targets, likelihood)
    dtype, device = form.params[0].dtype, form.params[0].device
    gen = probes.generator()
    samples = torch.stack(
        [
            form(probes.draw(1, form.dim, dtype=dtype, device=device, generator=gen)[0])
            for _ in range(num_probes)
        ]
    )
    if reduce_samples is not None:
        samples = reduce_samples(samples)
    mean, stderr = mean_and_stderr(samples)
    return Estimate(mean, stderr, num_probes, num_probes)
