r"""Adam with a pluggable diagonal curvature in the denominator.

One optimizer, three sources of the diagonal curvature ``h`` (p numbers, one per
parameter coordinate):

- ``"squared_gradient"``: ``h`` is the EMA of ``g^2``, the empirical Fisher diagonal;
  with ``update_every=1`` and no ``clip`` this is ``torch.optim.AdamW`` operation for
  operation.
- ``"hessian"``: ``h`` is the EMA of ``D^2`` for a Hessian diagonal estimate ``D``
  (Hutchinson's, handed in with :meth:`DiagCurvatureAdam.set_curvature`), as in
  AdaHessian (Yao et al., 2021).
- ``"fisher"``: ``h`` is the EMA of a Fisher or Gauss-Newton diagonal estimate (also
  handed in), used without the square root and with per-coordinate clipping, as in
  Sophia (Liu et al., 2023).

References:
    Loshchilov, I. and Hutter, F. (2019). Decoupled Weight Decay Regularization.
    Yao, Z., Gholami, A., Shen, S., Mustafa, M., Keutzer, K. and Mahoney, M. W.
    (2021). ADAHESSIAN: An Adaptive Second Order Optimizer for Machine Learning.
    Liu, H., Li, Z., Hall, D., Liang, P. and Ma, T. (2024). Sophia: A Scalable
    Stochastic Second-order Optimizer for Language Model Pre-training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "ADAHESSIAN_DEFAULTS",
    "CURVATURE_SOURCES",
    "FED_SOURCES",
    "SOPHIA_DEFAULTS",
    "DiagCurvatureAdam",
    "adahessian_like",
    "sophia_like",
    "spatial_average",
]

CURVATURE_SOURCES = ("squared_gradient", "hessian", "fisher")
#: Sources whose curvature is handed in by :meth:`DiagCurvatureAdam.set_curvature`.
FED_SOURCES = ("hessian", "fisher")
_DEFAULT_RHO = 0.04
_DEFAULT_FED_CLIP = 1.0

Estimates = Mapping[Tensor, Tensor] | Sequence[Tensor]


class DiagCurvatureAdam(Optimizer):
    r"""Adam whose denominator is a diagonal curvature estimate.

    .. math::
        \begin{aligned}
        &\rule{110mm}{0.4pt} \\
        &\textbf{input}: \gamma \text{ (lr)}, \beta_1, \beta_2 \text{ (betas)},
            \lambda \text{ (weight\_decay)}, \epsilon \text{ (eps)},
            k \text{ (update\_every)}, \rho, c \text{ (clip)},
            q \text{ (hessian\_power)} \\
        &\textbf{initialize}: m_0 \leftarrow 0, \; h \leftarrow 0,
            \; s \leftarrow 0 \text{ (curv\_step)} \\
        &\rule{110mm}{0.4pt} \\
        &\textbf{on } \texttt{set\_curvature}(D) \textbf{ (hessian, fisher)}: \\
        &\quad \textbf{if } \text{spatial\_averaging and } \theta
            \text{ is a kernel } (C_o, C_i, k_1, \dots):
            D \leftarrow \operatorname{mean}_{k_1, \dots} |D| \\
        &\quad \hat D \leftarrow D^2 \text{ (hessian)} \quad
            \hat D \leftarrow D \text{ (fisher)} \\
        &\quad \textbf{if } \hat D \text{ is finite}:
            h \leftarrow \beta_2 h + (1 - \beta_2) \hat D, \; s \leftarrow s + 1
            \quad \textbf{else}: \text{num\_dropped} \leftarrow
            \text{num\_dropped} + 1 \\
        &\rule{110mm}{0.4pt} \\
        &\textbf{for } t = 1, 2, \dots \textbf{ do} \\
        &\quad g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})
            \quad (-\nabla_\theta f_t \text{ if maximize}) \\
        &\quad \theta_t \leftarrow \theta_{t-1} - \gamma \lambda \theta_{t-1} \\
        &\quad m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        &\quad \textbf{if } \text{squared\_gradient and } (t - 1) \bmod k = 0:
            h \leftarrow \beta_2 h + (1 - \beta_2) g_t^2, \; s \leftarrow s + 1 \\
        &\quad \hat m \leftarrow m_t / (1 - \beta_1^t), \quad
            \hat h \leftarrow h / (1 - \beta_2^s) \; (\hat h \leftarrow 0
            \text{ while } s = 0) \\
        &\quad \textbf{squared\_gradient}: u \leftarrow \hat m /
            (\sqrt{\hat h} + \epsilon) \\
        &\quad \textbf{hessian}: u \leftarrow \hat m /
            ((\sqrt{\hat h})^q + \epsilon) \\
        &\quad \textbf{fisher}: u \leftarrow m_t / \max(\rho h, \epsilon) \\
        &\quad \theta_t \leftarrow \theta_t - \gamma \operatorname{clip}(u, -c, c) \\
        &\rule{110mm}{0.4pt} \\
        &\textbf{return } \theta_t
        \end{aligned}

    With ``curvature="squared_gradient"``, ``update_every=1`` and ``clip=None`` the
    update is ``torch.optim.AdamW``'s, with the same operations in the same order,
    so ``DiagCurvatureAdam(params, lr=..., weight_decay=...)`` reproduces AdamW. The
    update is a loop over parameters like AdamW's single-tensor implementation (its
    default on the CPU); AdamW's foreach and fused kernels on a GPU may differ from
    it in the last bits.

    For the estimate-fed sources (``"hessian"``, ``"fisher"``) every denominator is
    at least ``eps > 0`` and ``u`` is clipped to ``[-c, c]`` (``c = 1`` unless
    ``clip`` says otherwise), so whatever the estimate (negative, zero, huge), each
    coordinate moves by at most ``c * lr`` (plus the weight decay
    ``lr * weight_decay * |theta|``), in the direction of ``-m``, never against it.
    A non-finite estimate (NaN, inf, or a square that overflows) is not entered
    into ``h``: the whole call is dropped and counted in :attr:`num_dropped`.

    All operations are elementwise, so the state of a DTensor (FSDP2) parameter is
    a DTensor with the parameter's placements; an estimate may be given as a full
    tensor (every rank keeps its own shard of it) or as a DTensor.

    Args:
        params: Parameters or parameter groups; every option below may be set per
            group.
        lr: Learning rate ``gamma``; for the estimate-fed sources, the largest step
            of one coordinate.
        betas: ``(beta1, beta2)``: EMA coefficients of the gradient and of the
            curvature.
        eps: Added to the denominator (``"squared_gradient"``, ``"hessian"``) or
            its floor (``"fisher"``); must be positive for the estimate-fed sources.
        weight_decay: Decoupled weight decay ``lambda``: each step multiplies the
            parameters by ``1 - lr * weight_decay``, as AdamW does.
        curvature: ``"squared_gradient"``, ``"hessian"`` or ``"fisher"``.
        update_every: ``k``. For ``"squared_gradient"``, ``h`` takes ``g^2`` at
            steps 1, k + 1, 2k + 1, ...; for the estimate-fed sources, the schedule
            on which :class:`~curvlightning.lightning.feed.CurvatureFeed` computes
            estimates (``h`` changes only when an estimate arrives).
        rho: Scale of the curvature in the ``"fisher"`` denominator (the paper's
            ``gamma``, the reference implementation's ``rho``); ``None`` means 0.04.
            Only for ``"fisher"``.
        clip: Bound ``c`` on ``|u|``; ``None`` means 1 for the estimate-fed sources
            and no clipping for ``"squared_gradient"``. ``float("inf")`` turns it
            off (and with it the bound on the step).
        hessian_power: Exponent ``q`` in ``[0, 1]`` of ``sqrt(h_hat)`` (AdaHessian's
            ``k``). Only for ``"hessian"``.
        spatial_averaging: Replace the estimate of every parameter with 3 or more
            dimensions (a convolution kernel ``(C_out, C_in / groups, *kernel)``) by
            the mean of ``|D|`` over its kernel dimensions. Only for the
            estimate-fed sources.
        maximize: Maximise the objective instead of minimising it.

    Raises:
        ValueError: On an argument outside its range or an unknown ``curvature``,
            naming the argument and the remedy.

    Attributes:
        num_dropped: Estimates dropped because they were not finite (saved in
            :meth:`state_dict`).

    Example:
        >>> opt = DiagCurvatureAdam(model.parameters(), lr=1e-3, curvature="fisher")
        >>> loss.backward()
        >>> opt.set_curvature({p: d for p, d in zip(model.parameters(), diag)})
        >>> opt.step()

    Warning:
        Until the first estimate arrives, ``h = 0`` and an estimate-fed source takes
        clipped sign steps ``-lr * c * sign(m)``. Parameters for which no estimate
        is handed in keep their ``h``. Mixing sources across parameter groups is
        allowed; :meth:`set_curvature` accepts estimates only for parameters in
        estimate-fed groups. Inside ``ZeroRedundancyOptimizer`` each rank's
        optimizer holds a part of the parameters: hand each its own estimates (with
        ``drop`` decided on all ranks together), and note that the wrapper's
        consolidated ``state_dict`` keeps the per-parameter state but not
        :attr:`num_dropped`.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        curvature: str = "squared_gradient",
        update_every: int = 1,
        rho: float | None = None,
        clip: float | None = None,
        hessian_power: float = 1.0,
        spatial_averaging: bool = False,
        maximize: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "curvature": curvature,
            "update_every": update_every,
            "rho": rho,
            "clip": clip,
            "hessian_power": hessian_power,
            "spatial_averaging": spatial_averaging,
            "maximize": maximize,
        }
        _check_group(defaults, "")
        self.num_dropped = 0
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, filling and checking its options (see the class Args)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group(group, f" (parameter group {len(self.param_groups) - 1})")

    @property
    def update_every(self) -> int:
        """The curvature schedule ``k`` of the first estimate-fed group (else 1)."""
        for group in self.param_groups:
            if group["curvature"] in FED_SOURCES:
                return int(group["update_every"])
        return int(self.param_groups[0]["update_every"])

    # ------------------------------------------------------------------ state
    def _state_of(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            # step: scalar float32 tensor on the CPU, optimizer steps taken (t).
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            # curv_step: scalar float32 tensor on the CPU, updates of h so far (s).
            state["curv_step"] = torch.tensor(0.0, dtype=torch.float32)
            # exp_avg: m, shape, dtype, device and placements of p.
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            # exp_curv: h, shape, dtype, device and placements of p.
            state["exp_curv"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def state_dict(self) -> dict[str, Any]:
        """The standard optimizer state plus :attr:`num_dropped`."""
        out = super().state_dict()
        out["num_dropped"] = self.num_dropped
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; step counters stay float32 on the CPU.

        ``torch.optim.Optimizer.load_state_dict`` casts every state tensor except
        ``step`` to the parameter's dtype and device; ``curv_step`` is cast back so
        that a half-precision parameter does not round its count.
        """
        state_dict = dict(state_dict)
        num_dropped = int(state_dict.pop("num_dropped", 0))
        super().load_state_dict(state_dict)
        self.num_dropped = num_dropped
        for state in self.state.values():
            if "curv_step" in state:
                state["curv_step"] = _cpu_count(state["curv_step"])

    # -------------------------------------------------------------- curvature
    @torch.no_grad()
    def set_curvature(self, estimates: Estimates, *, drop: bool = False) -> bool:
        r"""Enter a diagonal curvature estimate into the EMA ``h``.

        For ``"hessian"`` groups ``h <- beta2 h + (1 - beta2) D^2``; for
        ``"fisher"`` groups ``h <- beta2 h + (1 - beta2) D`` (after spatial
        averaging where it is on). Call it once per estimate, before
        :meth:`step`; in a distributed run, with the same (rank-averaged) estimate
        on every rank.

        Args:
            estimates: The estimate ``D`` of each parameter, shaped like it: a
                mapping from parameter tensors to estimates, or a sequence aligned
                with the parameters of all groups in order. A mapping may leave
                parameters out (their ``h`` is kept).
            drop: Drop this estimate whatever its values (a caller that decided,
                with the other ranks, that it is not finite); counted like a
                non-finite one.

        Returns:
            Whether the estimate entered ``h``. A non-finite estimate is dropped as
            a whole and counted in :attr:`num_dropped`.

        Raises:
            ValueError: If a key is not a parameter of this optimizer, a shape does
                not match, a parameter's group takes no estimates
                (``"squared_gradient"``), or a sequence has the wrong length.
        """
        pairs = [
            (p, group, _entry(p, est, group))
            for p, group, est in self._match(estimates)
        ]
        # a list, not a generator: with DTensors every check is a collective
        finite = all([_all_finite(value) for _, _, value in pairs])
        if drop or not finite:
            self.num_dropped += 1
            return False
        for p, group, value in pairs:
            state = self._state_of(p)
            state["exp_curv"].mul_(group["betas"][1]).add_(
                value, alpha=1 - group["betas"][1]
            )
            state["curv_step"] += 1
        return True

    def _match(self, estimates: Estimates) -> list[tuple[Tensor, dict, Tensor]]:
        """Pair each estimate with its parameter and group; check shapes."""
        index = {
            id(p): (i, p, group)
            for i, (p, group) in enumerate(
                (p, g) for g in self.param_groups for p in g["params"]
            )
        }
        if isinstance(estimates, Mapping):
            items = list(estimates.items())
        else:
            items = self._aligned(estimates, index)
        out = []
        for key, est in items:
            if id(key) not in index:
                raise ValueError(
                    "set_curvature got an estimate keyed by a tensor of shape "
                    f"{tuple(key.shape)} that is not a parameter of this optimizer: "
                    "key the estimates by the parameter tensors themselves "
                    "(model.parameters()), not by copies or names"
                )
            i, p, group = index[id(key)]
            _check_estimate(i, p, group, est)
            out.append((p, group, est))
        return out

    def _aligned(self, estimates: Sequence[Tensor], index: dict) -> list:
        params = [p for _, p, _ in sorted(index.values(), key=lambda item: item[0])]
        if len(estimates) != len(params):
            raise ValueError(
                f"set_curvature got a sequence of {len(estimates)} estimates for an "
                f"optimizer with {len(params)} parameters: pass one estimate per "
                "parameter, in param_groups order, or a dict keyed by parameter"
            )
        return list(zip(params, estimates, strict=True))

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimization step (see the class docstring for the math).

        Args:
            closure: Re-evaluates the model and returns the loss (run with grad
                enabled, before the update reads any state).

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        "DiagCurvatureAdam does not support sparse gradients; use "
                        "torch.optim.SparseAdam for sparse embeddings"
                    )
                self._update(p, group)
        return loss

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        grad = -p.grad if group["maximize"] else p.grad
        state = self._state_of(p)
        state["step"] += 1
        lr, weight_decay = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]

        # decoupled weight decay, then the gradient EMA
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        state["exp_avg"].lerp_(grad, 1 - beta1)

        source = group["curvature"]
        if source == "squared_gradient":
            self._squared_gradient_step(p, grad, state, group)
        elif source == "hessian":
            self._hessian_step(p, state, group)
        else:
            self._fisher_step(p, state, group)

    def _squared_gradient_step(
        self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> None:
        beta1, beta2 = group["betas"]
        step = _count(state["step"])
        if (step - 1) % group["update_every"] == 0:
            state["exp_curv"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            state["curv_step"] += 1

        # AdamW's single-tensor update, in its order of operations
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2 ** _count(state["curv_step"])
        step_size = group["lr"] / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        denom = (state["exp_curv"].sqrt() / bias_correction2_sqrt).add_(group["eps"])
        clip = _clip_of(group)
        if clip is None:
            p.addcdiv_(state["exp_avg"], denom, value=-step_size)
            return
        ratio = state["exp_avg"].div(denom).div_(bias_correction1)
        p.add_(ratio.clamp_(-clip, clip), alpha=-group["lr"])

    def _hessian_step(
        self, p: Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> None:
        beta1, beta2 = group["betas"]
        bias_correction1 = 1 - beta1 ** _count(state["step"])
        curv_step = _count(state["curv_step"])
        bias_correction2 = 1 - beta2**curv_step if curv_step else 1.0

        # denominator (sqrt(h_hat))^q + eps >= eps > 0
        denom = state["exp_curv"].sqrt() / math.sqrt(bias_correction2)
        if group["hessian_power"] != 1:
            denom.pow_(group["hessian_power"])
        denom.add_(group["eps"])

        ratio = state["exp_avg"].div(bias_correction1).div_(denom)
        clip = _clip_of(group)
        p.add_(ratio.clamp_(-clip, clip), alpha=-group["lr"])

    def _fisher_step(
        self, p: Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> None:
        # denominator max(rho h, eps) >= eps > 0; no bias correction (as the paper)
        denom = state["exp_curv"].mul(_rho_of(group)).clamp_min_(group["eps"])
        ratio = state["exp_avg"].div(denom)
        clip = _clip_of(group)
        p.add_(ratio.clamp_(-clip, clip), alpha=-group["lr"])


# ------------------------------------------------------------ checks and casts
def _count(value: Tensor | float) -> float:
    """A step counter as a Python float (AdamW's ``_get_value`` on the CPU)."""
    return value.item() if isinstance(value, Tensor) else float(value)


def _cpu_count(value: Tensor | float) -> Tensor:
    return torch.tensor(_count(value), dtype=torch.float32)


def _check_group(group: dict[str, Any], where: str) -> None:
    """Raise ``ValueError`` on an option outside its range."""
    _check_hyper(group, where)
    _check_source_options(group, where)


def _check_hyper(group: dict[str, Any], where: str) -> None:
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    if isinstance(lr, Tensor) or not _real(lr) or lr < 0:
        raise ValueError(
            f"Invalid lr{where}: {lr!r}; the learning rate must be a non-negative "
            "float (e.g. 1e-3)"
        )
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas{where}: {betas!r}; pass (beta1, beta2)")
    for i, beta in enumerate(betas):
        if not _real(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(
                f"Invalid betas[{i}]{where}: {beta!r}; each of betas must lie in "
                "[0, 1) (e.g. (0.9, 0.999))"
            )
    if not _real(eps) or eps < 0:
        raise ValueError(f"Invalid eps{where}: {eps!r}; eps must be >= 0 (e.g. 1e-8)")
    if not _real(wd) or wd < 0:
        raise ValueError(
            f"Invalid weight_decay{where}: {wd!r}; weight_decay must be >= 0"
        )
    every = group["update_every"]
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(
            f"Invalid update_every{where}: {every!r}; pass a positive int number of "
            "steps between curvature updates"
        )


def _check_source_options(group: dict[str, Any], where: str) -> None:
    source = group["curvature"]
    if source not in CURVATURE_SOURCES:
        raise ValueError(
            f"Invalid curvature{where}: {source!r}; choose one of {CURVATURE_SOURCES}"
        )
    fed = source in FED_SOURCES
    if fed and not group["eps"] > 0:
        raise ValueError(
            f"Invalid eps{where}: {group['eps']!r}; curvature={source!r} needs "
            "eps > 0 so that zero or negative curvature keeps the step bounded"
        )
    rho, clip, power = group["rho"], group["clip"], group["hessian_power"]
    if rho is not None and (source != "fisher" or not _real(rho) or rho <= 0):
        raise ValueError(
            f"Invalid rho{where}: {rho!r}; rho must be a positive float and applies "
            f"only to curvature='fisher' (got curvature={source!r})"
        )
    if clip is not None and (not _real(clip) or not clip > 0):
        raise ValueError(
            f"Invalid clip{where}: {clip!r}; clip must be a positive float (or None "
            "for the default)"
        )
    if not _real(power) or not 0 <= power <= 1:
        raise ValueError(
            f"Invalid hessian_power{where}: {power!r}; it must lie in [0, 1]"
        )
    if power != 1 and source != "hessian":
        raise ValueError(
            f"Invalid hessian_power{where}: {power!r}; it applies only to "
            f"curvature='hessian' (got curvature={source!r}); leave it at 1.0"
        )
    if group["spatial_averaging"] and not fed:
        raise ValueError(
            f"Invalid spatial_averaging{where}: True; it applies only to the "
            f"estimate-fed sources {FED_SOURCES} (got curvature={source!r})"
        )


def _clip_of(group: dict[str, Any]) -> float | None:
    """The bound on ``|u|``: ``clip``, else 1 for the estimate-fed sources.

    Resolved at each step rather than stored, so that a wrapper that copies its own
    group options into this optimizer's (``ZeroRedundancyOptimizer``) keeps the
    defaults.
    """
    if group["clip"] is not None:
        return group["clip"]
    return _DEFAULT_FED_CLIP if group["curvature"] in FED_SOURCES else None


def _rho_of(group: dict[str, Any]) -> float:
    """The curvature scale of the ``"fisher"`` source: ``rho``, else 0.04."""
    return _DEFAULT_RHO if group["rho"] is None else group["rho"]


def _real(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return math.isfinite(value)


def _check_estimate(i: int, p: Tensor, group: dict[str, Any], est: Any) -> None:
    if group["curvature"] not in FED_SOURCES:
        raise ValueError(
            f"set_curvature got an estimate for parameter #{i} (shape "
            f"{tuple(p.shape)}), whose group has curvature="
            f"{group['curvature']!r}: that source computes its curvature from the "
            f"gradient; estimates apply only to groups with curvature in "
            f"{FED_SOURCES}"
        )
    if not isinstance(est, Tensor):
        raise ValueError(
            f"set_curvature got a {type(est).__name__} for parameter #{i}; pass a "
            "tensor shaped like the parameter"
        )
    if tuple(est.shape) != tuple(p.shape):
        raise ValueError(
            f"set_curvature got an estimate of shape {tuple(est.shape)} for "
            f"parameter #{i} of shape {tuple(p.shape)}: pass a diagonal shaped like "
            "the parameter (unflatten a flat diagonal first)"
        )


def _entry(p: Tensor, est: Tensor, group: dict[str, Any]) -> Tensor:
    """The value that enters ``h``: ``D^2`` (hessian) or ``D`` (fisher)."""
    est = _like_param(p, est.detach())
    if group["spatial_averaging"] and est.dim() >= 3:
        est = spatial_average(est)
    return est * est if group["curvature"] == "hessian" else est


def spatial_average(estimate: Tensor) -> Tensor:
    r"""The mean of ``|D|`` over the kernel dimensions of a convolution kernel.

    For a kernel of shape ``(C_out, C_in / groups, k_1, ..., k_n)`` (n >= 1) the
    result has shape ``(C_out, C_in / groups, 1, ..., 1)``:
    ``D'_{oi} = (1 / prod_j k_j) sum_{k} |D_{oik}|``, AdaHessian's spatial averaging
    (Yao et al., 2021, section 3.3), for any number of kernel dimensions.
    """
    dims = tuple(range(2, estimate.dim()))
    return estimate.abs().mean(dim=dims, keepdim=True)


def _like_param(p: Tensor, est: Tensor) -> Tensor:
    """The estimate in the parameter's dtype, device and (DTensor) placements.

    A full tensor for a DTensor parameter is cut locally (no communication): every
    rank must hold the same full estimate.
    """
    if not _is_dtensor(p):
        return est.to(device=p.device, dtype=p.dtype)
    from torch.distributed.tensor import distribute_tensor

    if _is_dtensor(est):
        return est.redistribute(p.device_mesh, p.placements).to(p.dtype)
    est = est.to(device=p.to_local().device, dtype=p.dtype)
    return distribute_tensor(est, p.device_mesh, p.placements, src_data_rank=None)


def _is_dtensor(tensor: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _all_finite(value: Tensor) -> bool:
    """Whether every entry is finite (over all shards of a DTensor)."""
    return bool(torch.isfinite(value).all())


# ---------------------------------------------------------------------- presets
#: AdaHessian's settings for image classification (Yao et al., 2021): lr 0.15,
#: betas (0.9, 0.999), eps 1e-4, Hessian power 1, a Hessian estimate every step,
#: spatial averaging of convolution kernels, and a decoupled weight decay that
#: shrinks the parameters by 5e-4 per step at lr 0.15.
ADAHESSIAN_DEFAULTS: dict[str, Any] = {
    "lr": 0.15,
    "betas": (0.9, 0.999),
    "eps": 1e-4,
    "weight_decay": 5e-4 / 0.15,
    "curvature": "hessian",
    "update_every": 1,
    "hessian_power": 1.0,
    "spatial_averaging": True,
}

#: Sophia-G's settings (Liu et al., 2024; the reference implementation's
#: defaults): lr 1e-4, betas (0.965, 0.99), rho 0.04, weight decay 0.1, eps 1e-12,
#: a Gauss-Newton-Bartlett estimate every 10 steps.
SOPHIA_DEFAULTS: dict[str, Any] = {
    "lr": 1e-4,
    "betas": (0.965, 0.99),
    "eps": 1e-12,
    "weight_decay": 0.1,
    "curvature": "fisher",
    "update_every": 10,
    "rho": 0.04,
}


def adahessian_like(
    params: Iterable[Tensor] | Iterable[dict[str, Any]], **overrides: Any
) -> DiagCurvatureAdam:
    r"""AdaHessian (Yao et al., 2021) as a :class:`DiagCurvatureAdam`.

    .. math::
        \begin{aligned}
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        h_t = \beta_2 h_{t-1} + (1 - \beta_2) D_t^2, \\
        \theta_t &= (1 - \gamma\lambda)\theta_{t-1} - \gamma
        \operatorname{clip}\Big(\frac{m_t / (1 - \beta_1^t)}
        {(\sqrt{h_t / (1 - \beta_2^t)})^q + \epsilon}, -1, 1\Big)
        \end{aligned}

    with ``D_t`` a Hutchinson estimate of the Hessian diagonal, spatially averaged
    over convolution kernels. Defaults: :data:`ADAHESSIAN_DEFAULTS` (lr 0.15, betas
    (0.9, 0.999), eps 1e-4, ``q = 1``, every step: the paper's image-classification
    settings and its reference implementation's); ``weight_decay = 5e-4 / 0.15`` is
    the reference's decoupled decay (5e-4 per step at lr 0.15).

    Departures from the paper: the ratio is clipped to ``[-1, 1]`` (pass
    ``clip=float("inf")`` to remove it), which bounds a step by ``lr`` when the
    estimate is near zero; the estimate is computed by
    :class:`~curvlightning.lightning.feed.CurvatureFeed` on the unwrapped module
    and averaged over ranks before it enters ``h``, where the reference takes
    ``|D|`` per device; before the first estimate the step is ``-lr sign(m)``.

    Args:
        params: Parameters or parameter groups.
        **overrides: Any :class:`DiagCurvatureAdam` argument.

    Returns:
        The optimizer.
    """
    return DiagCurvatureAdam(params, **{**ADAHESSIAN_DEFAULTS, **overrides})


def sophia_like(
    params: Iterable[Tensor] | Iterable[dict[str, Any]], **overrides: Any
) -> DiagCurvatureAdam:
    r"""Sophia-G (Liu et al., 2024) as a :class:`DiagCurvatureAdam`.

    .. math::
        \begin{aligned}
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        h_t = \beta_2 h_{t-k} + (1 - \beta_2) \hat h_t
        \text{ every } k \text{ steps}, \\
        \theta_t &= (1 - \gamma\lambda)\theta_{t-1} - \gamma
        \operatorname{clip}\Big(\frac{m_t}{\max(\rho h_t, \epsilon)}, -1, 1\Big)
        \end{aligned}

    with ``hat h = B * g_hat^2`` the Gauss-Newton-Bartlett estimate (``g_hat`` the
    gradient of the loss at labels sampled from the model, B the batch size).
    Neither ``m`` nor ``h`` is bias-corrected, as in the paper (Algorithm 3).
    Defaults: :data:`SOPHIA_DEFAULTS` (lr 1e-4, betas (0.965, 0.99), rho 0.04,
    weight decay 0.1, eps 1e-12, k = 10), the reference implementation's; its
    GPT-2 small run uses lr 3e-4, rho 0.03 and weight decay 0.2.

    Naming: the published paper writes the curvature scale as ``gamma`` (an early
    version clipped at a threshold ``rho`` instead); the reference implementation
    calls the scale ``rho`` and multiplies it by the number of tokens per batch
    because its ``h`` leaves out the factor B. Here ``rho`` is the paper's
    ``gamma`` and the estimate carries the factor B (``fisher_diagonal(kind="gnb")``
    returns ``c B g_hat^2``), so the reference's ``rho`` values carry over.

    Departures: the clip is symmetric on ``m / max(rho h, eps)`` (the reference
    clips ``|m| / (rho B h + 1e-15)`` above only, which lets a negative ``h`` step
    against the momentum); the estimate is averaged over ranks before it enters
    ``h``; a non-finite estimate is dropped.

    Args:
        params: Parameters or parameter groups.
        **overrides: Any :class:`DiagCurvatureAdam` argument.

    Returns:
        The optimizer.
    """
    return DiagCurvatureAdam(params, **{**SOPHIA_DEFAULTS, **overrides})
