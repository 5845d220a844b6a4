"""Test-session settings shared by every test module."""
import torch

# Test tensors are small: one intra-op thread per test process is as fast as two, and it keeps
# the suite from stalling in OpenMP barriers when the other core is busy (another test
# process, or pytest-xdist's second worker).
torch.set_num_threads(1)
