import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of thousands of tiny ops: a second thread only waits, and on a shared 2-core
    machine it makes them 10x slower. Used through pytestmark = pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
