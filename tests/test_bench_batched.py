"""``python -m tools.bench batched --direct-sizes``: the measurement behind
``DIRECT_MIN_NUMEL`` runs, times both paths of the same block, and records them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mlbfgs_hpc.batched import DIRECT_MIN_NUMEL, NO_DIRECT, choose_chunk
from tools.bench import batched


def test_direct_sizes_times_both_paths_of_each_block(tmp_path: Path) -> None:
    out = tmp_path / "direct.json"
    assert batched.main(["--direct-sizes", "3000", "5000", "--repeats", "2",
                         "--json", str(out)]) == 0
    rows = json.loads(out.read_text(encoding="utf-8"))["direct"]
    assert [row["numel"] for row in rows] == [3000, 5000]
    for row in rows:
        assert row["chunk"] == choose_chunk([batched.COMPANION_NUMEL, row["numel"]],
                                            direct_min_numel=NO_DIRECT)
        for path in ("chunked", "direct"):
            assert row["ms"][path]["n"] == 2 and row["ms"][path]["median"] > 0
        assert row["chunked_over_direct"]["median"] > 0


def test_model_table_adds_the_all_chunked_step_where_a_block_is_direct() -> None:
    device = torch.device("cpu")
    small = batched.measure("small", [1_290, 3_000], device=device, repeats=2, calls=2)
    assert small["direct_blocks"] == 0 and "all_chunked_over_batched" not in small
    big = batched.measure("big", [1_290, DIRECT_MIN_NUMEL], device=device, repeats=2, calls=2)
    assert big["direct_blocks"] == 1
    assert set(big["ms"]) == {"per-block", "batched", "all-chunked"}
    assert big["all_chunked_over_batched"]["n"] == 2
    assert big["per_block_over_batched"]["median"] > 0
