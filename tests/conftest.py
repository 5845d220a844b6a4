"""Test-session settings shared by every test module, and the suite's leak check."""
import multiprocessing
import os

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter. The variable must be set before
# anything imports triton, and timm does (through torch._dynamo) in most test modules.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test tensors are small: one intra-op thread per test process is as fast as two, and it keeps
# the suite from stalling in OpenMP barriers when the other core is busy (another test
# process, or pytest-xdist's second worker).
torch.set_num_threads(1)

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def no_leaked_child_processes():
    """Fail the test that leaves a child process running, and kill it. Data loader workers
    ignore SIGTERM, so one that outlived its test would make the interpreter's exit (which
    terminates and joins every child) wait for ever after the summary."""
    yield
    leaked = multiprocessing.active_children()
    for child in leaked:
        child.kill()
        child.join()
    if leaked:
        pytest.fail(f"left {len(leaked)} child process(es) running: "
                    f"{', '.join(child.name for child in leaked)}", pytrace=False)
