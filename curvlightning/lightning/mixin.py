"""How a LightningModule tells the curvature callbacks about its data and loss."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from curvlightning.core.likelihoods import Likelihood, get_likelihood

__all__ = ["CurvatureMixin"]

_TARGET_KEYS = ("targets", "target", "labels", "label", "y")
_INPUT_KEYS = ("inputs", "input", "x", "images", "image", "features")


class CurvatureMixin:
    """Mixin for a ``LightningModule`` whose loss curvature the callbacks measure.

    The defaults fit ``(x, y)`` batches (tuples or lists, or dicts with keys such as
    ``"x"``/``"inputs"`` and ``"y"``/``"targets"``), a forward pass that returns the
    outputs ``z``, and a negative log-likelihood loss named by
    :attr:`curvature_likelihood`: ``"categorical"`` (cross-entropy on logits),
    ``"gaussian"`` (mean squared error) or ``"bernoulli"`` (binary cross-entropy on
    logits). Override a method where the module differs.

    Example:
        >>> class Classifier(CurvatureMixin, LightningModule):
        ...     curvature_likelihood = "categorical"

    Attributes:
        curvature_likelihood: The likelihood of the training loss.
    """

    curvature_likelihood: str = "categorical"

    @property
    def likelihood(self) -> Likelihood:
        """The :class:`~curvlightning.core.likelihoods.Likelihood` of the loss."""
        return get_likelihood(self.curvature_likelihood)

    def curvature_inputs(self, batch: Any) -> Any:
        """The inputs of ``batch`` that :meth:`curvature_outputs` takes."""
        return _pick(batch, 0, _INPUT_KEYS, "inputs", type(self).__name__)

    def curvature_targets(self, batch: Any) -> Tensor:
        """The targets of ``batch``, with the batch dimension first."""
        return _pick(batch, 1, _TARGET_KEYS, "targets", type(self).__name__)

    def curvature_outputs(self, inputs: Any) -> Tensor:
        """The outputs ``z`` (logits) the loss takes; defaults to ``self(inputs)``."""
        return self(inputs)

    def curvature_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The scalar training loss; defaults to the likelihood's mean NLL.

        The default refuses targets that do not belong to the likelihood (float
        targets for ``"categorical"``, say), so that a mean-squared-error module
        left on the default likelihood fails instead of measuring another loss.
        """
        likelihood = self.likelihood
        likelihood.check(outputs, targets)
        return likelihood.loss(outputs, targets)

    def checked_curvature_outputs(self, inputs: Any) -> Tensor:
        """:meth:`curvature_outputs`, refusing anything but a tensor."""
        outputs = self.curvature_outputs(inputs)
        if not isinstance(outputs, Tensor):
            kind = type(outputs).__name__
            if isinstance(outputs, Mapping):
                kind = f"dict with keys {sorted(map(str, outputs))}"
            raise TypeError(
                "curvature_outputs(inputs) must return the outputs (logits) as one "
                f"tensor; {type(self).__name__}'s returned a {kind}. Override "
                "curvature_outputs(inputs) to return the tensor the loss takes"
            )
        return outputs


def _pick(batch: Any, index: int, keys: Sequence[str], what: str, owner: str) -> Any:
    if isinstance(batch, Mapping):
        for key in keys:
            if key in batch:
                return batch[key]
        found = sorted(map(str, batch))
    elif isinstance(batch, Sequence) and not isinstance(batch, str):
        if len(batch) >= 2:
            return batch[index]
        found = f"a {type(batch).__name__} of length {len(batch)}"
    else:
        found = f"a {type(batch).__name__}"
    raise TypeError(
        f"cannot find the {what} in a batch with {found} (looked for position "
        f"{index} of an (x, y) pair or keys {list(keys)}): override "
        f"curvature_{what}(batch) in {owner}"
    )
