"""Test-session settings shared by every test module."""

from __future__ import annotations

import torch

# The suite's tensors are small: one intra-op thread avoids oversubscribing the machine while
# mpirun jobs launched by other tests run beside the pytest process.
torch.set_num_threads(1)
