import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    # Decode steps here are ~[16, 64] x [64, 96] matmuls: a second intra-op thread only adds
    # synchronisation, and costs 10x in wall time when other processes share the two cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
