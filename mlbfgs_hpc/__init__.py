"""mlbfgs-hpc: momentum-based stochastic L-BFGS (mL-BFGS) for PyTorch on MPI/Horovod clusters.

``from mlbfgs_hpc import MLBFGS, build_blocks`` is all a training loop needs::

    optimizer = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.1)
"""

from __future__ import annotations

from .blocks import ParamBlock, build_blocks, blocks_from_parameters
from .comm import GradientReducer, LocalCommunicator, init_communicator
from .config import MLBFGSConfig
from .divergence import TrainingDivergedError
from .optimizer import MLBFGS
from .partition import Ownership, linear_partition
from .seeding import seed_everything

__all__ = [
    "MLBFGS", "MLBFGSConfig", "ParamBlock", "build_blocks", "blocks_from_parameters",
    "GradientReducer", "LocalCommunicator", "init_communicator", "Ownership",
    "linear_partition", "seed_everything", "TrainingDivergedError",
]
__version__ = "0.1.0"
