import os
import sys

import pytest
import torch

# the spine and the commands at the root, the benchmarks and the experiment drivers in folders of their own
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for folder in ("experiments", "bench", ""):
    sys.path.insert(0, os.path.join(ROOT, folder) if folder else ROOT)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of thousands of tiny ops: a second thread only waits, and on a shared 2-core
    machine it makes them 10x slower. Used through pytestmark = pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
