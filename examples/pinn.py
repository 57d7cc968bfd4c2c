"""A physics-informed network trained with the line-searched L-BFGS of MLBFGS.

    python examples/pinn.py                  # one process
    mpirun -np 2 python examples/pinn.py     # the same run on 2 ranks: each evaluates the
                                             # residual on its half of the points

The 2-D Poisson problem -Δu = 2π² sin πx sin πy, u = 0 on the boundary of the unit square
(mlbfgs_hpc.pinn); about 20 s on one CPU core. Each rank's closure returns its share of the
global loss times the number of ranks, so the ranks' average (what the optimizer searches on)
is the loss over every point.
"""

import torch

from mlbfgs_hpc import MLBFGS, build_blocks, init_communicator
from mlbfgs_hpc.pinn import PROBLEMS, PinnMLP, pinn_loss, pinn_residuals, relative_l2

comm = init_communicator()              # MPI under mpirun/srun; a local no-op otherwise
torch.set_num_threads(1)
problem = PROBLEMS["poisson"]()
points = problem.sample(n_interior=2000, n_constraint=400,
                        generator=torch.Generator().manual_seed(0))   # the same on every rank
mine = points.shard(rank=comm.rank, world_size=comm.size)           # this rank's points
torch.manual_seed(0)                                                 # the same initial weights
model = PinnMLP(input_dim=problem.input_dim, lower=problem.lower, upper=problem.upper)
optimizer = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=1,
                   line_search_fn="strong_wolfe", comm=comm)


def closure() -> torch.Tensor:
    optimizer.zero_grad()
    pde, boundary = pinn_residuals(problem, model, mine)
    loss = comm.size * pinn_loss(pde, boundary, weight=problem.constraint_weight,
                                 n_pde_total=2000, n_constraint_total=400)
    loss.backward()
    return loss


for step in range(15):
    loss = optimizer.step(closure)      # up to 20 L-BFGS iterations, each line-searched
if comm.rank == 0:
    print(f"loss {float(loss):.3e}, relative L2 error {relative_l2(model, problem):.2e}, "
          f"{optimizer.counters['func_evals']} closure evaluations")
