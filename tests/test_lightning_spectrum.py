"""The spectrum, diagonal and quadratic-model callbacks against dense references."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvlightning import (
    CurvatureMixin,
    HessianDiagonal,
    HessianSpectrum,
    HessianTrace,
    QuadraticModelCheck,
)
from curvlightning.core import FunctionalModel, HessianOperator, get_likelihood
from curvlightning.lightning.hessian import compare_diagonals


class Tiny(CurvatureMixin, pl.LightningModule):
    def __init__(self, lr: float = 0.0, likelihood: str = "categorical") -> None:
        super().__init__()
        self.curvature_likelihood = likelihood
        self.lr = lr
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return self.curvature_loss(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _loader(regression: bool = False) -> DataLoader:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(48, 4, generator=gen, dtype=torch.float64)
    if regression:
        y = torch.randn(48, 3, generator=gen, dtype=torch.float64)
    else:
        y = torch.randint(0, 3, (48,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _fit(module, callbacks, loader, max_steps=2):
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    return trainer


def _dense_hessian(module, batch) -> torch.Tensor:
    likelihood = get_likelihood(module.curvature_likelihood)
    model = FunctionalModel(module, loss=likelihood.loss, dtype=torch.float64)
    operator = HessianOperator(model, *batch)
    eye = torch.eye(operator.dim, dtype=torch.float64)
    return torch.stack([operator(e) for e in eye])


def test_spectrum_eigenvalues_equal_the_dense_ones_after_p_steps():
    module = Tiny()
    p = sum(q.numel() for q in module.parameters())
    spectrum = HessianSpectrum(
        every_n_steps=2,
        top_k=4,
        num_steps=p,
        density_probes=4,
        density_steps=p,
        curvature_batch="fixed",
        dtype="float64",
    )
    trainer = _fit(module, [spectrum], _loader())
    dense = torch.linalg.eigvalsh(_dense_hessian(module, spectrum._fixed_batch))
    top = dense.flip(0)[:4]
    metrics = trainer.callback_metrics
    logged = torch.tensor(
        [float(metrics[f"curvature/hessian_eigenvalues/{i}"]) for i in range(1, 5)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(logged, top, rtol=1e-6, atol=1e-9)
    trace = float(metrics["curvature/hessian_density_trace"])
    err = float(metrics["curvature/hessian_density_trace_stderr"])
    assert abs(trace - float(dense.sum())) < 4 * err + 1e-9
    (row,) = spectrum.densities
    grid = torch.tensor(row["grid"])
    area = torch.trapezoid(torch.tensor(row["density"]), grid)
    assert float(area) == pytest.approx(1.0, abs=1e-2)


def test_spectrum_arguments_are_checked():
    with pytest.raises(ValueError, match="top_k=8 needs at least as many"):
        HessianSpectrum(top_k=8, num_steps=4)
    with pytest.raises(ValueError, match="density_probes must be a positive int"):
        HessianSpectrum(density_probes=0)


def test_hutchpp_trace_is_unbiased_through_the_callback():
    module = Tiny()
    values, errors = [], []
    for seed in range(6):
        trace = HessianTrace(
            every_n_steps=2,
            num_probes=30,
            estimator="hutch++",
            seed=seed,
            curvature_batch="fixed",
            dtype="float64",
        )
        _fit(module, [trace], _loader())
        values.append(trace.history[0]["value"])
        errors.append(trace.history[0]["stderr"])
    exact = float(torch.trace(_dense_hessian(module, trace._fixed_batch)))
    mean = sum(values) / len(values)
    spread = (sum(e * e for e in errors) ** 0.5) / len(errors)
    assert abs(mean - exact) < 4 * spread + 1e-9


def test_hutchpp_needs_three_probes():
    with pytest.raises(ValueError, match="needs num_probes >= 3, got 2"):
        HessianTrace(num_probes=2, estimator="hutch++")
    with pytest.raises(ValueError, match="estimator must be one of"):
        HessianTrace(estimator="exact")


def test_hessian_diagonal_converges_and_compares_fisher():
    module = Tiny()
    callback = HessianDiagonal(
        every_n_steps=2,
        num_probes=3000,
        compare_fisher=["mc"],
        mc_samples=200,
        curvature_batch="fixed",
        dtype="float64",
    )
    trainer = _fit(module, [callback], _loader())
    dense = torch.diagonal(_dense_hessian(module, callback._fixed_batch))
    estimate = torch.cat([v for v in callback._last_diagonal.values()])
    assert float((estimate - dense).norm() / dense.norm()) < 0.1
    rel_error = float(trainer.callback_metrics["curvature/fisher_mc_vs_hessian"])
    corr = float(trainer.callback_metrics["curvature/fisher_mc_vs_hessian_corr"])
    assert 0.0 < rel_error < 1.0
    assert 0.5 < corr <= 1.0


def test_compare_diagonals_on_known_vectors():
    hessian = torch.tensor([1.0, 2.0, 3.0, 4.0])
    fisher = torch.tensor([1.0, 2.0, 3.0, 0.0])
    out = compare_diagonals("k", fisher, hessian, {"a": slice(0, 2), "b": slice(2, 4)})
    assert float(out["k"].value) == pytest.approx(4.0 / float(hessian.norm()))
    assert float(out["k"].parts["a"].value) == 0.0
    assert float(out["k_corr"].parts["a"].value) == pytest.approx(1.0)
    assert float(out["k_corr"].parts["b"].value) == pytest.approx(-1.0)


def test_quadratic_model_is_exact_for_a_quadratic_loss():
    """Linear model with squared error: the quadratic model predicts every step."""

    class Linear(Tiny):
        def __init__(self):
            super().__init__(lr=0.05, likelihood="gaussian")
            self.net = nn.Linear(4, 3).double()

    check = QuadraticModelCheck(
        every_n_steps=1, newton_iters=50, damping=0.0, dtype="float64"
    )
    trainer = _fit(Linear(), [check], _loader(regression=True), max_steps=3)
    metrics = trainer.callback_metrics
    assert float(metrics["curvature/quadratic_model/ratio"]) == pytest.approx(
        1.0, rel=1e-8
    )
    assert float(metrics["curvature/quadratic_model/actual"]) < 0
    assert sorted({row["step"] for row in check.history}) == [1, 2, 3]


def test_quadratic_model_newton_step_minimises_a_quadratic():
    """For a quadratic, the Newton step's predicted change is -g^T H^-1 g / 2."""

    class Linear(Tiny):
        def __init__(self):
            super().__init__(lr=0.05, likelihood="gaussian")
            self.net = nn.Linear(4, 3).double()

    check = QuadraticModelCheck(
        every_n_steps=1, newton_iters=100, damping=0.0, dtype="float64"
    )
    module = Linear()
    trainer = _fit(module, [check], _loader(regression=True), max_steps=1)
    x, y = next(iter(_loader(regression=True)))
    with torch.no_grad():
        before = F.mse_loss(module(x), y)
    predicted = float(
        trainer.callback_metrics["curvature/quadratic_model/newton_predicted"]
    )
    assert predicted < 0
    assert -predicted <= float(before) + 1e-9


def test_quadratic_form_estimator_equals_hutchinson_through_the_callback():
    common = {"every_n_steps": 2, "num_probes": 7, "curvature_batch": "fixed"}
    common["dtype"] = "float64"
    forms = HessianTrace(estimator="quadratic_form", **common)
    plain = HessianTrace(estimator="hutchinson", per_layer=False, **common)
    _fit(Tiny(), [forms], _loader())
    _fit(Tiny(), [plain], _loader())
    assert forms.history[0]["value"] == pytest.approx(
        plain.history[0]["value"], rel=1e-9
    )
    assert forms.history[0]["stderr"] == pytest.approx(
        plain.history[0]["stderr"], rel=1e-9
    )


def test_quadratic_form_estimator_refuses_other_networks():
    class Residual(Tiny):
        def forward(self, x):
            return self.net(x) + x[:, :3]

    trace = HessianTrace(
        estimator="quadratic_form", every_n_steps=1, num_probes=2, dtype="float64"
    )
    with pytest.raises(ValueError, match="needs the module's outputs to be those"):
        _fit(Residual(), [trace], _loader())
