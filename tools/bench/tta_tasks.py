"""Time-to-accuracy tasks: the settings the comparison runs and the lr grids it sweeps.

A :class:`Task` is one model/dataset/batch-size setting (its length, evaluation period,
targets, warm-up and per-optimizer driver flags); :func:`default_tasks` is the comparison's
list of them. The protocol that runs a task is :mod:`tta`.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlbfgs_hpc.options import default_warmup_steps

from .driver import OPTIMIZERS

TARGETS: tuple[float, ...] = (0.85, 0.88, 0.90)
DIGITS_TARGETS: tuple[float, ...] = (0.85, 0.88, 0.90, 0.95, 0.97)
#: Three learning rates per optimizer, 2.4x apart. mL-BFGS runs plain SGD-momentum until its
#: first curvature pair (step 2T) and Shampoo is SGD-grafted, so SGD, mL-BFGS, Shampoo and
#: L-BFGS share one grid (bracketing the driver's SGD default 0.05); Adam has its own scale.
_SGD_LIKE = (0.025, 0.06, 0.15)
_ADAM = (4e-4, 1e-3, 2.5e-3)
#: Muon's own lr (its hidden matrices, before torch's per-shape adjustment): ×2–2.5 apart from
#: torch's documented example, 0.02, upwards (an orthogonalised step of a wide matrix moves each
#: entry by about lr/√(larger side), less than Adam's lr does).
_MUON = (0.02, 0.05, 0.1)
LR_GRID: dict[str, tuple[float, ...]] = {
    "mlbfgs": _SGD_LIKE,
    "sgd": _SGD_LIKE,
    "adam": _ADAM,
    "lbfgs": _SGD_LIKE,
    "shampoo": _SGD_LIKE,
    "adamw": _ADAM,
    "muon": _MUON,
}


@dataclass(frozen=True)
class Task:
    """One model/dataset/batch-size setting of the comparison.

    Args:
        name: label used in file names and tables.
        model: ``--model`` of the driver.
        dataset: ``--dataset`` of the driver.
        eval_every: steps between test evaluations.
        full_grid: every lr on every seed (cheap tasks) instead of a sweep, then finals.
        epochs: length of the final (multi-seed) runs in epochs (or ``steps``).
        steps: length of the final runs in optimizer steps (overrides ``epochs``).
        sweep_fraction: a sweep run is the final run truncated after this fraction of its
            steps (same schedule, stopped early) when not ``full_grid``.
        sweep_seeds: number of seeds (the first ones of ``seeds``) the sweep runs; the best
            lr maximises (accuracy) or minimises (loss) the median metric at the sweep's end.
        seeds: seeds of the final runs.
        sweep: sweep the lr grid at all; ``False`` (``--quick`` only) takes the middle lr.
        log_every: steps between training-loss records.
        targets: metric values to time; the last one also picks the lr of a full grid.
        metric: ``"test_accuracy"`` (higher is better) or ``"test_loss"`` (lower is better).
        batch_size: global batch size.
        warmup_fraction: linear lr warm-up over this fraction of the run, for every optimizer;
            ``None`` (the default) is ``mlbfgs-train``'s own default warm-up (10 % of the run,
            :func:`mlbfgs_hpc.options.default_warmup_steps`).
        lr_grid: per-optimizer lr grids (default :data:`LR_GRID`).
        flags: extra driver flags per optimizer, e.g. mL-BFGS's ``--update-freq`` scaled to
            the batch size (``(("mlbfgs", ("--update-freq", "10")),)``).
        muon_adamw_lr: ``muon``'s ``--muon-adamw-lr`` (the lr of the parameters its AdamW
            half trains); default the middle of the task's Adam grid. Fixed, not swept: the
            grid is over Muon's own lr.
    """

    name: str
    model: str
    dataset: str
    eval_every: int
    full_grid: bool
    epochs: float | None = None
    steps: int | None = None
    sweep_fraction: float = 0.5
    sweep_seeds: int = 1
    seeds: tuple[int, ...] = (0, 1, 2)
    sweep: bool = True
    log_every: int = 10
    targets: tuple[float, ...] = TARGETS
    metric: str = "test_accuracy"
    batch_size: int = 128
    warmup_fraction: float | None = None
    lr_grid: tuple[tuple[str, tuple[float, ...]], ...] | None = None
    flags: tuple[tuple[str, tuple[str, ...]], ...] = ()
    muon_adamw_lr: float | None = None

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "test_accuracy"

    def grid(self, optimizer: str) -> tuple[float, ...]:
        return dict(self.lr_grid or ()).get(optimizer, LR_GRID[optimizer])

    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, round((self.epochs or 1.0) * _steps_per_epoch(self)))

    def warmup_steps(self) -> int:
        if self.warmup_fraction is None:
            return default_warmup_steps(self.total_steps())
        return round(self.warmup_fraction * self.total_steps())

    def extra_flags(self, optimizer: str) -> list[str]:
        # The warm-up is always explicit, so that a run's spec.json records it.
        flags = ["--batch-size", str(self.batch_size), "--warmup-steps", str(self.warmup_steps())]
        if optimizer == "muon":
            adam = self.grid("adam")
            lr = self.muon_adamw_lr if self.muon_adamw_lr is not None else adam[len(adam) // 2]
            flags += ["--muon-adamw-lr", repr(lr)]
        return flags + list(dict(self.flags).get(optimizer, ()))


def _steps_per_epoch(task: Task) -> int:
    """Optimizer steps per epoch of the task's training split (drop_last batches)."""
    from mlbfgs_hpc.data import load_dataset

    return len(load_dataset(task.dataset, split="train")) // task.batch_size


#: Learning-rate grids (×2 apart, bracketing the batch-128 defaults; ×3.16 apart for the
#: language model, whose scale was unknown). The large-batch grids first assumed ×2 larger lrs
#: per ×8 batch; measured (BENCHMARKS §9.5, §9.7: 10 % warm-up, sweeps over 3 seeds) the
#: SGD-like optimizers' best lrs stay at 0.05–0.1 (SGD at 0.2: dead at 1,024, 68 % at 4,096) while
#: Adam's grow (8e-3 at 1,024, 3.2e-2 at 4,096), so the grids are centred there.
_LARGE_BATCH = {1024: ((0.05, 0.1, 0.2), (4e-3, 8e-3, 1.6e-2)),
                4096: ((0.05, 0.1, 0.2), (8e-3, 1.6e-2, 3.2e-2))}


def _grid(sgd_like: tuple[float, ...], adam: tuple[float, ...], *,
          adamw: tuple[float, ...] | None = None, muon: tuple[float, ...] = _MUON
          ) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """Per optimizer: ``adam`` for Adam (and AdamW unless ``adamw``), ``muon`` for Muon's
    own lr, ``sgd_like`` for the rest."""
    special = {"adam": adam, "adamw": adamw or adam, "muon": muon}
    return tuple((o, special.get(o, sgd_like)) for o in OPTIMIZERS)


TASK_NAMES: tuple[str, ...] = ("mlp-digits", "cnn-fmnist-b128", "cnn-fmnist-b1024",
                               "cnn-fmnist-b4096", "lm-pystdlib", "resnet18w8-fmnist")


def default_tasks(*, quick: bool, names: tuple[str, ...] = TASK_NAMES) -> list[Task]:
    """The comparison's tasks (``names`` selects some), or a minutes-long ``quick`` subset."""
    if quick:
        return [
            Task("mlp-digits", "mlp", "digits", epochs=15, eval_every=1, full_grid=True,
                 seeds=(0,), targets=DIGITS_TARGETS),
            Task("cnn-fmnist-b128", "cnn", "fashion-mnist", epochs=0.1, eval_every=23,
                 full_grid=False, seeds=(0,), sweep=False),
        ]
    tasks = [
        # 90 % falls within 2 epochs (~20 steps) on digits, long before mL-BFGS's first pair
        # (step 2T = 100): the 95/97 % targets are the ones where curvature can matter.
        Task("mlp-digits", "mlp", "digits", epochs=20, eval_every=1, full_grid=True,
             targets=DIGITS_TARGETS),
        # The embedded default run. Two sweep seeds: on one seed a short sweep picked an lr
        # at the edge of stability (measured: SGD at 0.15 collapsed to 10 % on seed 1).
        # Adam's grid is BENCHMARKS §9.9's: with the default warm-up its best was 8e-3.
        # AdamW's adds 1.6e-2 (8e-3, Adam's best, is that grid's top); Muon's AdamW half
        # trains at Adam's best lr, 8e-3 (docs/benchmarks/2026-12-07-muon-adamw.md).
        Task("cnn-fmnist-b128", "cnn", "fashion-mnist", epochs=2, eval_every=117,
             full_grid=False, sweep_seeds=2, targets=(0.88, 0.89, 0.90),
             lr_grid=_grid((0.05, 0.1, 0.2), (2e-3, 4e-3, 8e-3),
                           adamw=(2e-3, 4e-3, 8e-3, 1.6e-2), muon=(0.02, 0.05, 0.1, 0.2)),
             muon_adamw_lr=8e-3),
    ]
    # Large global batches (what many ranks give): 10 % warm-up for everyone, mL-BFGS's T
    # scaled so that a pair still spans ~6–20 k samples as at batch 128 (T = 50); mL-BFGS's
    # double damping (the default since BENCHMARKS §9.3's re-run) is what keeps its H·g from
    # blowing up there (§9.5, §9.7). At 4,096 the targets are where SGD-momentum ends within
    # 8 epochs (§9.7: 82.7-83.2 %; 85 % only Adam, and mL-BFGS on one seed).
    for batch, epochs, period, targets in ((1024, 4, 10, (0.85, 0.88, 0.89)),
                                           (4096, 8, 5, (0.80, 0.82, 0.85))):
        sgd_like, adam = _LARGE_BATCH[batch]
        steps_per_epoch = 60000 // batch
        tasks.append(Task(
            f"cnn-fmnist-b{batch}", "cnn", "fashion-mnist", epochs=epochs,
            eval_every=max(1, steps_per_epoch // 2), full_grid=False, batch_size=batch,
            warmup_fraction=0.1, targets=targets, lr_grid=_grid(sgd_like, adam),
            flags=(("mlbfgs", ("--update-freq", str(period))),)))
    tasks += [
        # Character LM on Python's own sources: 1000 steps of 64 windows of 64 characters
        # (~1 epoch); a 2-layer, 120 k-parameter transformer keeps a run to minutes on a core.
        # AdamW's grid adds 3e-2 (1e-2, Adam's best, is the top); Muon's AdamW half trains
        # at Adam's best lr, 1e-2 (docs/benchmarks/2026-12-07-muon-adamw.md).
        Task("lm-pystdlib", "transformer", "python-stdlib", steps=1000, eval_every=100,
             full_grid=False, metric="test_loss", targets=(2.0, 1.8, 1.7), batch_size=64,
             lr_grid=_grid((0.1, 0.3, 1.0), (1e-3, 3e-3, 1e-2),
                           adamw=(1e-3, 3e-3, 1e-2, 3e-2), muon=(0.01, 0.02, 0.05, 0.1)),
             flags=tuple((o, ("--depth", "2")) for o in OPTIMIZERS), muon_adamw_lr=1e-2),
        # ResNet-18's 41 layers at width 8 (0.18 M parameters): one epoch, a short CPU run.
        Task("resnet18w8-fmnist", "resnet18", "fashion-mnist", epochs=1, eval_every=117,
             full_grid=False, targets=(0.85, 0.87, 0.88),
             lr_grid=_grid((0.05, 0.1, 0.2), (1e-3, 2e-3, 4e-3)),
             flags=tuple((o, ("--width", "8")) for o in OPTIMIZERS)),
    ]
    return [t for t in tasks if t.name in names]
