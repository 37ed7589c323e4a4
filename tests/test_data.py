import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from curvlightning.data import DigitsDataModule


def _setup(**kwargs):
    data = DigitsDataModule(**kwargs)
    data.setup("fit")
    return data


def _targets(dataset):
    return dataset.tensors[1].numpy()


def test_split_sizes_add_up_and_follow_val_fraction():
    data = _setup(val_fraction=0.25)
    num_train, num_val = len(data.train_set), len(data.val_set)
    assert num_train + num_val == 1797
    assert num_val == int(np.ceil(0.25 * 1797))


def test_split_is_stratified():
    data = _setup(val_fraction=0.2)
    overall = np.bincount(load_digits().target, minlength=10) / 1797
    for dataset in (data.train_set, data.val_set):
        counts = np.bincount(_targets(dataset), minlength=10)
        share = counts / counts.sum()
        np.testing.assert_allclose(share, overall, atol=0.01)


def test_split_depends_on_seed_only():
    first, again = _setup(seed=3), _setup(seed=3)
    other = _setup(seed=4)
    torch.testing.assert_close(first.val_set.tensors[0], again.val_set.tensors[0])
    assert not torch.equal(first.val_set.tensors[0], other.val_set.tensors[0])


def test_train_split_is_standardised():
    x = _setup().train_set.tensors[0]
    std = x.std(dim=0, unbiased=False)
    constant = std < 1e-6
    assert constant.any(), "the digits have constant border pixels"
    torch.testing.assert_close(x.mean(dim=0), torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(std[~constant], torch.ones(64)[~constant])
    assert torch.equal(x[:, constant], torch.zeros_like(x[:, constant]))


def test_validation_uses_train_statistics_without_blowing_up():
    # Pixel 24 is zero on every training image of seed 0 and lit on two of the
    # validation images: it must stay on pixel scale, not be divided by ~0.
    x_val = _setup(seed=0).val_set.tensors[0]
    assert torch.isfinite(x_val).all()
    assert x_val[:, 24].abs().max() <= 16
    assert x_val.mean(dim=0).abs().max() < 1.0


def test_dtypes_shapes_and_properties():
    data = _setup(batch_size=32)
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (32, data.num_features) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and 0 <= y.min() and y.max() < data.num_classes
    assert (data.num_features, data.num_classes) == (64, 10)


def test_images_when_not_flattened():
    x, _ = next(iter(_setup(flatten=False, batch_size=8).val_dataloader()))
    assert x.shape == (8, 1, 8, 8)


def test_train_order_is_seeded_and_keeps_last_batch():
    data = _setup(batch_size=100, seed=1)
    first = torch.cat([y for _, y in data.train_dataloader()])
    again = torch.cat([y for _, y in data.train_dataloader()])
    assert torch.equal(first, again)
    assert not torch.equal(first, data.train_set.tensors[1])
    assert len(first) == len(data.train_set)


def test_loader_before_setup_says_what_to_do():
    with pytest.raises(RuntimeError, match=r"call `setup\(\)`"):
        DigitsDataModule().train_dataloader()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_fraction": 1.5}, r"`val_fraction` must be in \(0, 1\): got 1.5"),
        ({"val_fraction": 0.0}, r"`val_fraction` must be in \(0, 1\): got 0.0"),
        ({"val_fraction": 0.001}, r"leaves 2 of 1797 samples for validation"),
        ({"batch_size": 0}, r"`batch_size` must be a positive integer: got 0"),
        ({"batch_size": 2.5}, r"`batch_size` must be a positive integer: got 2.5"),
        ({"num_workers": -1}, r"`num_workers` must be a non-negative .*got -1"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)
