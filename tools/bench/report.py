"""The harness's ``summary.md``: the Markdown tables of every section that ran, rendered from
``results.json`` (``--report-only`` renders them again without running anything)."""

from __future__ import annotations

import math
from typing import Any

from . import common


def summary_markdown(results: dict[str, Any]) -> str:
    """The Markdown tables of every section that ran."""
    m = results["machine"]
    v = m["versions"]
    parts = [
        "# Benchmark summary",
        f"Command: `{results['command']}`, started {results['started']}, "
        f"{results.get('total_seconds', math.nan) / 60:.1f} min; torch threads per process: "
        f"{results['threads']}; load average (1/5/15 min) at start "
        f"{results['load_average']['start']}, at end {results['load_average'].get('end')}.",
        f"Machine: {m['cpu_model']}, {m['cpus']} CPUs ({m['cores_per_socket']} cores/socket, "
        f"{m['threads_per_core']} thread/core), L2 {m['l2_cache']}, L3 {m['l3_cache']}, "
        f"{m['memory_gib']} GiB, {m['os']}, hypervisor {m['hypervisor']}.",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val is not None)
        + f", Python {m['python']}.",
    ]
    sec = results["sections"]
    if "overhead" in sec:
        parts.append(_md_overhead(sec["overhead"]))
    if "bandwidth" in sec:
        parts.append(_md_bandwidth(sec["bandwidth"]))
    if "scaling" in sec:
        parts.append(_md_scaling(sec["scaling"]))
    if "checkpoint" in sec:
        parts.append(_md_checkpoint(sec["checkpoint"]))
    if "tta" in sec:
        parts.append(_md_tta(sec["tta"]))
    return "\n\n".join(parts) + "\n"


def _md_overhead(res: dict[str, Any]) -> str:
    f = common.fmt_stat
    out = ["## Per-iteration overhead"]
    for cfg in res["configs"]:
        out.append(f"### {cfg['label']} ({cfg['parameters']:,} parameters, {cfg['blocks']} "
                   f"blocks, batch {cfg['batch_size']}, history {cfg['history']}, T = "
                   f"{cfg['update_freq']}, {cfg['repeats']} windows of {cfg['window_steps']} "
                   f"steps, {cfg['threads']} thread(s))")
        out.append(common.markdown_table(
            ["optimizer", "ms / iteration", "iteration / SGD", "params finite"],
            [[o, f(cfg["iteration_ms"][o], digits=2), f(cfg["ratio_to_sgd"][o]),
              cfg["params_finite"][o]] for o in cfg["ratio_to_sgd"]]))
        total = cfg["breakdown_ms_per_step"]["step total"]["median"]
        rows = [[p, f(s, digits=3), f"{100 * s['median'] / total:.0f} %"]
                for p, s in cfg["breakdown_ms_per_step"].items() if p != "step total"]
        rows.append(["**mL-BFGS step total**", f(cfg["breakdown_ms_per_step"]["step total"],
                                                 digits=3), "100 %"])
        rows.append(["SGD step (torch.optim.SGD)", f(cfg["sgd_step_ms"], digits=3), ""])
        out.append(common.markdown_table(["mL-BFGS step piece", "ms / step", "share"], rows))
        out.append(f"mL-BFGS step / SGD step: {f(cfg['mlbfgs_step_over_sgd_step'], digits=1)};"
                   f" step share of the mL-BFGS iteration: "
                   f"{f(cfg['mlbfgs_step_share_of_iteration'], digits=2)}; pairs accepted "
                   f"{cfg['mlbfgs_counters']['accepted_pairs']}, rejected "
                   f"{cfg['mlbfgs_counters']['rejected_pairs']}.")
    return "\n\n".join(out)


def _md_bandwidth(res: dict[str, Any]) -> str:
    f = common.fmt_stat
    st = res["stream"]
    from .bandwidth import stream_kernel_model_ms as model

    for row in res["two_loop"]:
        if "loop_model_ms" not in row:  # results written before the model existed
            row.update(model(row, st))
    out = ["## Memory bandwidth and the two-loop recursion",
           common.markdown_table(
               ["kernel (float32, 128 MiB arrays)", "bytes counted", "GB/s median [IQR]",
                "best"],
               [[k, f"{st[k]['bytes'] / st['n']:.0f}·n",
                 f(st[k]["gbps"], digits=2), f"{st[k]['best_gbps']:.2f}"]
                for k in ("triad", "axpy_inplace", "dot", "copy")]),
           common.markdown_table(
               ["m", "n", "two-loop ms", "kernel-bytes GB/s", "of DRAM triad",
                "history-bytes GB/s", "of DRAM triad", "of same-size triad",
                "compact ms", "compact speed-up"],
               [[r["history"], f"{r['n']:.0e}", f(r["loop_ms"], digits=3),
                 f(r["loop_gbps"], digits=1), f(r["loop_fraction_of_dram_triad"], digits=2),
                 f(r["loop_history_gbps"], digits=1),
                 f(r["loop_history_fraction_of_dram_triad"], digits=2),
                 f(r["loop_fraction_of_footprint_triad"], digits=2),
                 f(r["compact_ms"], digits=3), f(r["compact_speedup"], digits=2)]
                for r in res["two_loop"]]),
           common.markdown_table(
               ["m", "n", "two-loop ms", "STREAM-kernel model ms", "of the limit",
                "compact ms", "compact model ms", "of the limit"],
               [[r["history"], f"{r['n']:.0e}", f"{r['loop_ms']['median']:.3f}",
                 f"{r['loop_model_ms']:.3f}", f"{r['loop_fraction_of_model']:.2f}",
                 f"{r['compact_ms']['median']:.3f}", f"{r['compact_model_ms']:.3f}",
                 f"{r['compact_fraction_of_model']:.2f}"] for r in res["two_loop"]]),
           common.markdown_table(
               ["m", "n", "compact vs loop (f64)", "loop f32 vs f64", "compact f32 vs f64"],
               [[c["history"], c["n"], f"{c['rel_err_compact_vs_loop_f64']:.1e}",
                 f"{c['rel_err_loop_f32_vs_f64']:.1e}", f"{c['rel_err_compact_f32_vs_f64']:.1e}"]
                for c in res["correctness"]])]
    return "\n\n".join(out)


def _md_scaling(res: dict[str, Any]) -> str:
    f = common.fmt_stat
    rows = []
    for s in res["configs"]:
        if "error" in s:
            rows.append([s["ranks"], s["backend"], f"error: {s['error'][:80]}"] + [""] * 7)
            continue
        rows.append([
            s["ranks"], s["backend"],
            f"{s['state_bytes_max'] / 2**20:.1f} ({s.get('ideal_state_bytes', math.nan) / 2**20:.1f})",
            f"{s.get('sharded_state_over_ideal', math.nan):.2f}",
            f(s["local_ms"], digits=1), f"{s.get('local_step_over_ideal', math.nan):.2f}",
            f(s["grad_reduce_ms"], digits=1), f(s["allgatherv_ms"], digits=1),
            f(s["fwd_bwd_ms"], digits=1), f(s["iteration_ms"], digits=1)])
    return "\n\n".join([
        f"## Scaling over ranks ({res['cores']} cores; {res['repeats']} launch(es) x "
        f"{res['timed_steps']} timed steps per configuration)",
        common.markdown_table(
            ["p", "grad backend", "state MiB/rank (ideal 1/p)", "sharded state / ideal",
             "optimizer local ms", "local / ideal", "grad allreduce wait ms",
             "Allgatherv ms", "fwd+bwd ms", "iteration ms"], rows)])


def _md_checkpoint(res: dict[str, Any]) -> str:
    if "error" in res:
        return f"## Checkpoints\n\nnot measured: {res['error']}"
    disk = res.get("disk", {})
    rows = [[r["world_size"], f"{r['checkpoint_bytes'] / 2**20:.2f}", r.get("files"),
             f"{r['write_s'] * 1e3:.0f}", f"{r['read_s'] * 1e3:.0f}",
             f"{r['read_no_digest_s'] * 1e3:.0f}", f"{r['write_mib_per_s']:.0f}",
             f"{r.get('write_fraction_of_disk', math.nan):.2f}"]
            for r in res.get("runs", []) if r]
    return "\n\n".join([
        "## Checkpoints",
        f"Disk sequential write (+fsync) in the same run: {disk.get('mib_per_s', math.nan):.0f}"
        f" MiB/s. Command: `{res.get('command', '')}`",
        common.markdown_table(["ranks", "size MiB", "files", "write ms", "read ms",
                               "read ms (no sha256)", "write MiB/s", "of disk"], rows)])


def _warmup_words(task: dict[str, Any]) -> str:
    """The task's lr warm-up as the table heading gives it; results written before the
    harness recorded steps (2026-12-03) carry a fraction of the run instead."""
    if "warmup_steps" in task:
        return f"{task['warmup_steps']} steps"
    return f"{task.get('warmup_fraction') or 0:g} of the run"


def _md_tta(res: dict[str, Any]) -> str:
    f = common.fmt_stat
    out = ["## Time to accuracy",
           f"Normalised clock: steps × per-iteration median from the overhead section "
           f"({res.get('iteration_ms_source') or 'not available'})."]
    for t in res["tasks"]:
        metric = t.get("metric", "test_accuracy")
        word = "accuracy" if metric == "test_accuracy" else "loss"
        if not t.get("swept", True):
            protocol = "no lr sweep (--quick: middle lr of the grid)"
        elif t["full_grid"]:
            protocol = f"full lr grid × seeds, best lr = fewest steps to {t['targets'][-1]:g}"
        else:
            protocol = (f"lr sweep on {t.get('sweep_seeds', 1)} seed(s) over the first "
                        f"{t.get('sweep_fraction', 0.5):g} of the run, best lr = best median "
                        f"final test {word}")
        out.append(f"### {t['task']} ({t['model']} on {t['dataset']}, global batch "
                   f"{t.get('batch_size', 128)}): final runs {t.get('steps')} steps, seeds "
                   f"{t['seeds']}, eval every {t['eval_every']} steps, warm-up "
                   f"{_warmup_words(t)}; {protocol}")
        keys = [x if isinstance(x, str) else
                (f"{int(round(100 * x))}" if metric == "test_accuracy" else f"{x:g}")
                for x in t["targets"]]
        unit = " %" if metric == "test_accuracy" else f" ({word})"
        out.append(common.markdown_table(
            ["optimizer", "best lr", "final test accuracy", "final test loss",
             "train s (raw)"],
            [[opt, f"{e['lr']:g}", f(e["final_accuracy"], digits=4),
              f(e["final_test_loss"], digits=4), f(e["train_seconds"], digits=1)]
             for opt, e in t["per_optimizer"].items()]))
        rows = []
        for k in keys:
            for opt, e in t["per_optimizer"].items():
                rows.append([f"{k}{unit}", opt, e[f"reached_{k}"],
                             f(e[f"steps_to_{k}"], digits=0),
                             f(e[f"epochs_to_{k}"], digits=2), f(e[f"seconds_to_{k}"], digits=2),
                             f(e[f"time_ratio_to_sgd_{k}"], digits=2),
                             f(e.get(f"norm_time_ratio_to_sgd_{k}", {}), digits=2),
                             f(e.get(f"time_ratio_to_adam_{k}", {}), digits=2)])
        out.append(common.markdown_table(
            ["target", "optimizer", "seeds reaching", "steps", "epochs", "seconds (raw)",
             "time / SGD (raw, same seed)", "time / SGD (normalised)",
             "time / Adam (raw, same seed)"], rows))
        counters = t["per_optimizer"].get("mlbfgs", {}).get("counters")
        if counters:
            nus = [c["last_nu"] for c in counters.values() if c.get("last_nu") is not None]
            gammas = [c["last_gamma"] for c in counters.values()
                      if c.get("last_gamma") is not None]
            first = next(iter(counters.values()))
            out.append(f"mL-BFGS at the end of the final runs: step-size guard ν (last step) "
                       f"{f(common.summarize(nus), digits=3)}, γ {f(common.summarize(gammas))}, "
                       f"pairs accepted {first.get('accepted_pairs')} / rejected "
                       f"{first.get('rejected_pairs')} (seed {next(iter(counters))}), SGD "
                       f"fallbacks {sum(int(c.get('sgd_fallbacks') or 0) for c in counters.values())}.")
        sweep = [r for r in t.get("sweep", []) if r.get("phase") == "sweep"]
        if sweep:
            cells: dict[tuple[str, float], list[str]] = {}
            for r in sorted(sweep, key=lambda r: (r["optimizer"], r["lr"], r["seed"])):
                value = r["final_accuracy"] if metric == "test_accuracy" else r[
                    "final_test_loss"]
                cells.setdefault((r["optimizer"], r["lr"]), []).append(
                    "div" if r.get("error") else f"{value:.3f}")
            out.append(f"lr sweep, final test {word} per seed (`div`: stopped on a "
                       f"non-finite loss; **bold**: chosen):")
            out.append(common.markdown_table(
                ["optimizer", "lr", f"final test {word} per sweep seed"],
                [[opt, f"**{lr:g}**" if lr == t["best_lr"][opt] else f"{lr:g}",
                  " / ".join(accs)] for (opt, lr), accs in cells.items()]))
    return "\n\n".join(out)
