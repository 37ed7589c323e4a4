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
