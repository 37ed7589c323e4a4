r"""Sampled rows of the logit Jacobian ``J = dz/dtheta``, as vector-Jacobian products.

For a batch with outputs ``z`` of shape ``(N, k)`` the Jacobian ``J`` has shape
``(N, k, p)``; it is never formed. A row is a vector-Jacobian product (VJP)
``J^T u = sum_{n,c} u_{nc} dz_{nc}/dtheta`` for a projection ``u`` shaped like
``z``: one backward pass, the cost of one gradient, however large N and k are.
Forming J would take ``N k`` backward passes and ``N k p`` numbers.

The row of class c is taken over the batch: ``u_{nc'} = [c' = c]`` for every n,
so the row is ``sum_n dz_{nc}/dtheta``, the Jacobian row of the batch-summed
logit (divide by N for the batch-mean logit). That is one VJP per row; a
per-sample row would cost one VJP per sample and class. Per-sample rows are still
available as projections with a single non-zero sample,
``u_{n'c'} = [n' = n][c' = c]``. Several rows share one forward pass and go
through the backward pass together (``torch.autograd.grad`` with
``is_grads_batched=True``, chunked to a memory budget); operations that vmap cannot
batch fall back to one backward pass per row.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvlightning.core.estimators import Estimate, check_num_probes, mean_and_stderr
from curvlightning.core.functional import FunctionalModel, flatten
from curvlightning.core.gradients import (
    DEFAULT_MEMORY_BUDGET,
    as_functional,
    chunk_size_for_budget,
)
from curvlightning.core.operators import flatten_batched
from curvlightning.core.probes import ProbeSource

__all__ = [
    "ROW_KINDS",
    "JacobianRowNorms",
    "class_sensitivity",
    "jacobian_frobenius_estimate",
    "jacobian_row_norms",
    "jacobian_rows",
]

#: The named row selections; class indices or projections can be passed instead.
ROW_KINDS = ("top", "all")

#: Copies of a row held per batched VJP: the per-parameter pieces, the flat row,
#: and the batched intermediates of the backward pass.
_VJP_FACTOR = 3

Rows = Sequence[int] | Tensor | str


@dataclass(frozen=True)
class JacobianRowNorms:
    """Squared norms of Jacobian rows, whole and per segment.

    Attributes:
        sq_norms: ``|J^T u_i|^2`` for each row i, shape ``(r,)``.
        parts: The squared norm of each row restricted to a segment (a layer's
            coordinates), shape ``(r,)`` per segment; they add up to ``sq_norms``
            when the segments cover every parameter once.
    """

    sq_norms: Tensor
    parts: Mapping[str, Tensor] = field(default_factory=dict)

    @property
    def norms(self) -> Tensor:
        """The row norms ``|J^T u_i|``, shape ``(r,)``."""
        return self.sq_norms.sqrt()


def jacobian_rows(
    model: FunctionalModel | nn.Module,
    inputs: Any,
    rows: Rows,
    *,
    num_top: int = 1,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    batched: bool = True,
) -> Tensor:
    r"""Rows ``J^T u_i`` of the batch's output Jacobian, shape ``(r, p)``.

    Args:
        model: The model (a plain module is wrapped in a ``FunctionalModel``).
        inputs: Inputs of the batch; the outputs must be ``(N, k)`` for class rows.
        rows: Class indices ``[c_1, ..., c_r]`` (row i is
            ``sum_n dz_{n c_i}/dtheta``); projections ``u`` of shape
            ``(r, *z.shape)`` (row i is ``sum_{n,c} u_{inc} dz_{nc}/dtheta``);
            ``"top"`` (row i is ``sum_n dz_{n, c_i(n)}/dtheta`` with ``c_i(n)`` the
            i-th largest logit of sample n, for i < ``num_top``); or ``"all"``
            (every class, r = k).
        num_top: Rows for ``rows="top"``.
        memory_budget: Bytes a chunk of batched rows may take.
        batched: Batch the rows of a chunk through one backward pass; ``False``
            runs one backward pass per row.

    Returns:
        The rows, ordered like ``FunctionalModel.params`` along the last axis.

    Raises:
        ValueError: On an unknown row kind, a class index out of range, or
            projections of the wrong shape.
    """
    model = as_functional(model)
    leaves, outputs = _forward(model, inputs)
    u = _projections(rows, outputs.detach(), num_top)
    return torch.cat(list(_vjps(outputs, leaves, u, memory_budget, batched)))


def jacobian_row_norms(
    model: FunctionalModel | nn.Module,
    inputs: Any,
    rows: Rows,
    *,
    num_top: int = 1,
    segments: Mapping[str, slice] | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    batched: bool = True,
) -> JacobianRowNorms:
    """Squared norms of Jacobian rows, with a per-segment (per-layer) breakdown.

    The rows are those of :func:`jacobian_rows` (same arguments); only one chunk
    of rows is held at a time.

    Args:
        model: The model (a plain module is wrapped in a ``FunctionalModel``).
        inputs: Inputs of the batch.
        rows: Class indices, projections, ``"top"`` or ``"all"``.
        num_top: Rows for ``rows="top"``.
        segments: Named index ranges of the flat parameter vector (layers).
        memory_budget: Bytes a chunk of batched rows may take.
        batched: Batch the rows of a chunk through one backward pass.

    Returns:
        The squared norms, whole and per segment.
    """
    model = as_functional(model)
    leaves, outputs = _forward(model, inputs)
    u = _projections(rows, outputs.detach(), num_top)
    segments = dict(segments or {})
    whole, parts = [], {name: [] for name in segments}
    for chunk in _vjps(outputs, leaves, u, memory_budget, batched):
        whole.append(chunk.square().sum(dim=1))
        for name, s in segments.items():
            parts[name].append(chunk[:, s].square().sum(dim=1))
    return JacobianRowNorms(
        torch.cat(whole), {name: torch.cat(v) for name, v in parts.items()}
    )


def class_sensitivity(
    model: FunctionalModel | nn.Module,
    inputs: Any,
    *,
    segments: Mapping[str, slice] | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    batched: bool = True,
) -> JacobianRowNorms:
    """How strongly each class's batch-summed logit moves with the parameters.

    Row c is ``sum_n dz_{nc}/dtheta``; its squared norm (and its per-layer parts)
    is returned for every class, k VJPs in all. See :func:`jacobian_row_norms`.

    Args:
        model: The model; its outputs must be ``(N, k)``.
        inputs: Inputs of the batch.
        segments: Named index ranges of the flat parameter vector (layers).
        memory_budget: Bytes a chunk of batched rows may take.
        batched: Batch the rows of a chunk through one backward pass.

    Returns:
        The squared norms, shape ``(k,)``, whole and per segment.
    """
    return jacobian_row_norms(
        model,
        inputs,
        "all",
        segments=segments,
        memory_budget=memory_budget,
        batched=batched,
    )


def jacobian_frobenius_estimate(
    model: FunctionalModel | nn.Module,
    inputs: Any,
    probes: ProbeSource,
    num_probes: int,
    *,
    segments: Mapping[str, slice] | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    batched: bool = True,
    offset: int = 0,
    total: int | None = None,
    reduce_vjp: Callable[[Tensor], Tensor] | None = None,
) -> Estimate:
    r"""Hutchinson's estimate of ``||J||_F^2`` from VJPs with output-space probes.

    With probes ``u`` shaped like the outputs and ``E[u u^T] = I``,

    .. math::
        \mathbb{E}_u \|J^\top u\|^2 = \operatorname{tr}(J J^\top) = \|J\|_F^2
        = \sum_n \|d z_n / d\theta\|_F^2,

    one VJP per probe. With Rademacher probes the variance of one term is
    ``2 (||J J^T||_F^2 - sum_i (J J^T)_ii^2)``. A segment s is estimated from the
    same probes as ``|(J^T u)[s]|^2``, unbiased for ``||J[:, s]||_F^2``.

    Args:
        model: The model (a plain module is wrapped in a ``FunctionalModel``).
        inputs: Inputs of the batch; the outputs may have any shape.
        probes: The probe source (Rademacher or Gaussian).
        num_probes: Number of probes, at least 1.
        segments: Named index ranges whose blocks are reported in ``parts``.
        memory_budget: Bytes a chunk of batched VJPs may take.
        batched: Batch the probes of a chunk through one backward pass.
        offset: Where this rank's samples start in a global batch of ``total``
            (shared probes across ranks: every sample gets the probe entries it
            would get on one rank).
        total: Samples in the global batch; ``None``: this batch only.
        reduce_vjp: Applied to each chunk of VJPs ``J_r^T u`` (shape ``(n, p)``)
            before squaring: a sum over ranks makes the terms those of the
            global batch, ``||sum_r J_r^T u_r||^2``.

    Returns:
        The estimate, with one VJP per probe.
    """
    check_num_probes(num_probes)
    model = as_functional(model)
    leaves, outputs = _forward(model, inputs)
    rows = outputs.shape[0]
    total = rows if total is None else total
    u = probes.draw(
        num_probes,
        total * (outputs.numel() // max(rows, 1)),
        dtype=outputs.dtype,
        device=outputs.device,
    ).reshape(num_probes, total, *outputs.shape[1:])[:, offset : offset + rows]
    segments = dict(segments or {})
    terms = []
    for chunk in _vjps(outputs, leaves, u, memory_budget, batched):
        if reduce_vjp is not None:
            chunk = reduce_vjp(chunk)
        blocks = [chunk[:, s].square().sum(dim=1) for s in segments.values()]
        terms.append(torch.stack([chunk.square().sum(dim=1), *blocks], dim=1))
    mean, stderr = mean_and_stderr(torch.cat(terms))
    parts = {
        name: Estimate(mean[j + 1], stderr[j + 1], num_probes, num_probes)
        for j, name in enumerate(segments)
    }
    return Estimate(mean[0], stderr[0], num_probes, num_probes, parts)


def _forward(model: FunctionalModel, inputs: Any) -> tuple[tuple[Tensor, ...], Tensor]:
    """Leaves that require grad and the outputs computed from them (with graph)."""
    leaves = tuple(p.detach().requires_grad_(True) for p in model.params)
    with torch.enable_grad():
        outputs = model.outputs(leaves, model.cast(inputs))
    return leaves, outputs


def _projections(rows: Rows, outputs: Tensor, num_top: int) -> Tensor:
    """The projections ``u`` of shape ``(r, *outputs.shape)`` that select rows."""
    if isinstance(rows, Tensor):
        if rows.dim() < 1 or rows.shape[1:] != outputs.shape:
            raise ValueError(
                f"projections must have shape (r, *outputs.shape) = (r, "
                f"{', '.join(map(str, outputs.shape))}); got {tuple(rows.shape)}"
            )
        return rows.to(dtype=outputs.dtype, device=outputs.device)
    num_classes = _num_classes(outputs, rows)
    if isinstance(rows, str):
        return _named_projections(rows, outputs, num_top, num_classes)
    classes = [int(c) for c in rows]
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise ValueError(
            f"rows must be non-empty class indices in [0, {num_classes}), got {classes}"
        )
    u = outputs.new_zeros(len(classes), *outputs.shape)
    u[torch.arange(len(classes)), :, torch.tensor(classes)] = 1.0
    return u


def _num_classes(outputs: Tensor, rows: Rows) -> int:
    if outputs.dim() != 2:
        raise ValueError(
            f"rows={rows!r} selects classes and needs outputs of shape (N, k); got "
            f"{tuple(outputs.shape)}. Pass projections of shape (r, *outputs.shape)"
        )
    return outputs.shape[1]


def _named_projections(
    rows: str, outputs: Tensor, num_top: int, num_classes: int
) -> Tensor:
    if rows == "all":
        return _projections(list(range(num_classes)), outputs, num_top)
    if rows != "top":
        raise ValueError(
            f"rows must be one of {ROW_KINDS}, class indices or projections; got "
            f"{rows!r}"
        )
    if not 1 <= num_top <= num_classes:
        raise ValueError(
            f"num_top must be in [1, {num_classes}] (the number of classes), got "
            f"{num_top}"
        )
    top = outputs.topk(num_top, dim=1).indices.T  # (num_top, N)
    u = outputs.new_zeros(num_top, *outputs.shape)
    return u.scatter_(2, top.unsqueeze(-1), 1.0)


def _vjps(
    outputs: Tensor,
    leaves: Sequence[Tensor],
    u: Tensor,
    budget: int,
    batched: bool,
) -> Iterator[Tensor]:
    """``J^T u_i`` for the rows of ``u``, a chunk ``(c, p)`` at a time."""
    num_params = sum(p.numel() for p in leaves)
    itemsize = outputs.element_size()
    chunk = chunk_size_for_budget(
        num_params, itemsize, budget, u.shape[0], factor=_VJP_FACTOR
    )
    for block in u.split(chunk):
        if batched:
            try:
                yield _batched_vjp(outputs, leaves, block)
                continue
            except (RuntimeError, NotImplementedError) as err:
                warnings.warn(
                    f"batched VJPs failed ({err}); falling back to one backward "
                    "pass per row",
                    stacklevel=3,
                )
                batched = False
        yield torch.stack([_vjp(outputs, leaves, row) for row in block])


def _batched_vjp(outputs: Tensor, leaves: Sequence[Tensor], block: Tensor) -> Tensor:
    grads = torch.autograd.grad(
        outputs,
        leaves,
        grad_outputs=block,
        retain_graph=True,
        allow_unused=True,
        is_grads_batched=True,
    )
    rows = block.shape[0]
    return flatten_batched(
        tuple(
            g if g is not None else p.new_zeros(rows, *p.shape)
            for g, p in zip(grads, leaves, strict=True)
        )
    )


def _vjp(outputs: Tensor, leaves: Sequence[Tensor], row: Tensor) -> Tensor:
    grads = torch.autograd.grad(
        outputs, leaves, grad_outputs=row, retain_graph=True, allow_unused=True
    )
    return flatten(
        [
            g if g is not None else torch.zeros_like(p)
            for g, p in zip(grads, leaves, strict=True)
        ]
    )
