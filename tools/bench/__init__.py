"""The benchmarks of mlbfgs-hpc (never part of the tests): one entry point, one module each.

::

    python -m tools.bench [--quick] [--only SECTIONS] [--out DIR]   the CPU harness
    python -m tools.bench gpu --out DIR [--quick]                   the CUDA path on one GPU
    python -m tools.bench multinode [--iters N]                     2 namespace hosts (root)
    python -m tools.bench netpaths [--rates none 1gbit]             gradient/update paths (root)
    python -m tools.bench alphabeta measure|project                 alpha-beta fit, projection
    python -m tools.bench checkpoint [--ranks 1,4]                  checkpoint cost (JSON)

(``python tools/bench ...`` is the same command.) Results, method and plots: BENCHMARKS.md.

=================  ===========================================================================
``__main__``       the entry point: dispatches to the harness or a stand-alone benchmark
``harness``        the CPU harness: runs the sections, writes results.json, CSVs and plots
``report``         ``summary.md``: the Markdown tables of every section, from results.json
``common``         shared by all: statistics (median, quartiles), timers, machine facts,
                   result files, the ``mpirun`` environment and ``python -m`` of a sibling
``driver``         the training driver as the benchmarks use it (``BenchTrainer``, Shampoo)
``overhead``       per-iteration cost vs SGD-momentum, the mL-BFGS step in pieces
``bandwidth``      STREAM rates vs the two-loop recursion and the compact form of H·g
``scaling``        1/2/4 ranks: per-rank state and step pieces vs the ideal 1/p
``scaling_worker`` one rank of ``scaling`` (run under ``mpirun``)
``checkpoint``     checkpoint size, write and read time vs the disk's write speed
``tta``            time to accuracy against SGD, Adam, L-BFGS and Shampoo
``tta_tasks``      its tasks (model, dataset, length, targets, warm-up) and lr grids
``tta_runs``       its training runs, each in a fresh process, read back from metrics.jsonl
``tta_analysis``   its results: steps/seconds to each target, tta.csv rows, plots
``gpu``            the CUDA path (iteration, H·g) on one GPU
``multinode``      cross-host communication cost on 2 namespace hosts
``netpaths``       the gradient/update paths of a training step on shaped links: bytes per
                   step per host and iteration time, old path vs new, alternating
``alphabeta``      alpha-beta fit of the collectives on shaped links; projection to 1,024 ranks
=================  ===========================================================================
"""
