import sys

import pytest
import torch


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread, then restore the previous count.

    The tiny float64 models of the curvature tests gain nothing from threads, and
    on a shared machine the thread pool's waits cost more than the arithmetic.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _close_wandb_runs():
    """Close a wandb run a test left open, so the next test starts its own."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()
