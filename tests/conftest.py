import pytest
import torch
import torch.distributed as dist

# One intra-op thread for the whole session, module fixtures included: a forked rank whose parent had entered an
# OpenMP parallel region hangs in libgomp at its own first one (seen: a 2-rank fit stuck in ExpertBank.keep_slots).
torch.set_num_threads(1)


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


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a CUDA GPU (``scripts/gpu-check.sh`` runs them on one); without one they are
    skipped, with the reason in the summary."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu-check.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
