import pytest
import torch
import torch.distributed as dist


@pytest.fixture(autouse=True)
def _deterministic_and_single_threaded():
    """A fixed global seed, and one intra-op thread: on a 2-core machine shared with rank processes, a second
    spinning worker thread slows tests down many times over. A process group left by an in-process run (a
    one-device Trainer) is destroyed, so later forked ranks start clean."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    yield
    torch.set_num_threads(threads)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
