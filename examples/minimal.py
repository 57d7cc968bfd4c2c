"""mL-BFGS on scikit-learn's handwritten digits: the smallest training loop with the library.

    python examples/minimal.py                   # one process
    mpirun -np 2 python examples/minimal.py      # the same script on 2 ranks

Every rank takes its shard of each global batch; ``MLBFGS`` averages the gradients over the
ranks (Horovod where it imports, mpi4py otherwise) and each rank updates the layers it owns.
Needs scikit-learn for the data (``pip install "mlbfgs-hpc[data]"``).
"""

import logging

import torch
import torch.nn.functional as F

from mlbfgs_hpc import MLBFGS, build_blocks, init_communicator, seed_everything
from mlbfgs_hpc.data import GlobalBatchSampler, load_dataset
from mlbfgs_hpc.models import build_model

BATCH = 128  # global: over all ranks

logging.basicConfig(level=logging.INFO, format="%(message)s")
comm = init_communicator()  # one process: local; under mpirun: MPI
seed_everything(0)  # the same initial model on every rank
train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
model = build_model("mlp", in_shape=train.in_shape, num_classes=train.num_classes)
optimizer = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.1, comm=comm)
sampler = GlobalBatchSampler(dataset_size=len(train), global_batch_size=BATCH, seed=0,
                             rank=comm.rank, world_size=comm.size)
for epoch in range(20):
    for _, idx in sampler.iter_epoch(epoch):  # this rank's share of the global batch
        optimizer.zero_grad()
        # Sum over the shard, scaled so that the averaged gradient is the global mean's.
        loss = F.cross_entropy(model(train.x[idx]), train.y[idx], reduction="sum")
        (loss * comm.size / BATCH).backward()
        optimizer.step()
with torch.no_grad():
    accuracy = (model(test.x).argmax(1) == test.y).float().mean().item()
if comm.rank == 0:
    logging.info("test accuracy after 20 epochs: %.2f %%", 100 * accuracy)
