"""What a production training loop needs around ``MLBFGS``, on scikit-learn's digits.

    python examples/production.py                   # one process
    mpirun -np 2 python examples/production.py      # 2 ranks, same script
    sbatch --signal=USR1@120 --requeue ...          # on a cluster: see jobs/README.md

* data sharding: every rank takes its shard of each global batch, in an order that depends
  only on the seed, so a resumed run (on any number of ranks) sees the same batches;
* periodic HDF5 checkpoints (``mlbfgs_hpc.checkpoint``): model, optimizer (each rank its own
  blocks), LR schedule, RNG states and the data position, the newest ``--keep`` kept;
* resume from the newest valid checkpoint of the run directory (a damaged one is skipped);
* SIGUSR1/SIGTERM (SLURM's warning before the time limit, PBS's before the walltime):
  every rank checkpoints at the same step and the process exits with 99, which a job script
  answers by requeueing the job; the rerun resumes where this one stopped.

Needs scikit-learn for the data (``pip install "mlbfgs-hpc[data]"``).
"""

import argparse
import logging
import sys
import time

import torch
import torch.nn.functional as F

from mlbfgs_hpc import MLBFGS, build_blocks, init_communicator, seed_everything
from mlbfgs_hpc.checkpoint import resume, save_checkpoint
from mlbfgs_hpc.data import GlobalBatchSampler, load_dataset
from mlbfgs_hpc.models import build_model
from mlbfgs_hpc.signals import EXIT_OK, EXIT_REQUEUE, StopRequest

logger = logging.getLogger("production")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/production-example")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128, help="global, over all ranks")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps")
    p.add_argument("--keep", type=int, default=3, help="newest checkpoints kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-sleep", type=float, default=0.0,
                   help="seconds to sleep after each step (to rehearse the signal cycle)")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    stop = StopRequest()  # first: a scheduler's early warning must not kill the start-up
    comm = init_communicator()
    logging.basicConfig(level=logging.INFO if comm.rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {comm.rank}] %(message)s", datefmt="%H:%M:%S")
    seed_everything(args.seed)
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    model = build_model("mlp", in_shape=train.in_shape, num_classes=train.num_classes)
    optimizer = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=args.lr, comm=comm)
    sampler = GlobalBatchSampler(dataset_size=len(train), global_batch_size=args.batch_size,
                                 seed=args.seed, rank=comm.rank, world_size=comm.size)
    total = args.epochs * sampler.batches_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)

    step = 0
    loaded = resume(args.run_dir, model=model, optimizer=optimizer, comm=comm,
                    scheduler=scheduler)  # also restores every rank's RNG states
    if loaded is not None:
        step = loaded.step
        logger.info("resumed from %s at step %d (written on %d ranks)", loaded.path, step,
                    loaded.world_size)

    def checkpoint() -> None:
        epoch, batch_index = divmod(step, sampler.batches_per_epoch)
        path = save_checkpoint(args.run_dir, step=step, model=model, optimizer=optimizer,
                               comm=comm, scheduler=scheduler, keep=args.keep,
                               extra={"epoch": epoch, "batch_index": batch_index})
        logger.info("checkpoint %s", path)

    while step < total:
        epoch, batch_index = divmod(step, sampler.batches_per_epoch)
        idx = sampler.local_indices(epoch, batch_index)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(train.x[idx]), train.y[idx], reduction="sum")
        (loss * comm.size / args.batch_size).backward()
        optimizer.step()
        scheduler.step()
        step += 1
        time.sleep(args.step_sleep)
        # One small collective per step: the global loss, and whether any rank was signalled,
        # so that every rank stops at the same step.
        loss_sum, signalled = comm.allgather_scalars([loss.item(), float(stop.requested)]
                                                     ).sum(axis=0)
        if step % 50 == 0:
            logger.info("step %d/%d: training loss %.4f", step, total,
                        loss_sum / args.batch_size)
        if signalled or step % args.checkpoint_every == 0 or step == total:
            checkpoint()
        if signalled:
            logger.warning("stop requested: checkpoint at step %d written, exiting with %d "
                           "(rerun to resume)", step, EXIT_REQUEUE)
            return EXIT_REQUEUE
    with torch.no_grad():
        accuracy = (model(test.x).argmax(1) == test.y).float().mean().item()
    logger.info("done: %d steps, test accuracy %.2f %%", step, 100 * accuracy)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
