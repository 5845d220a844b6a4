"""Test-session settings shared by every test module."""
import os

import torch

# Without a GPU, Triton kernels run in its interpreter. The variable must be set before
# anything imports triton, and timm does (through torch._dynamo) in most test modules.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test tensors are small: one intra-op thread per test process is as fast as two, and it keeps
# the suite from stalling in OpenMP barriers when the other core is busy (another test
# process, or pytest-xdist's second worker).
torch.set_num_threads(1)
