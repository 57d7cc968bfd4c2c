"""The alpha-beta model of ``tools/bench/alphabeta.py`` (pure math; no MPI, no network).

* The fit weights relative errors: on sizes spanning five decades, one slow large transfer
  (measured: the 64 MiB exchange at half the link's rate) drove the plain least-squares
  intercept negative; the relative fit keeps alpha near the small messages' latency.
* The projection's ring steps cost their slowest link, and on one host the new path (flat
  reduce-scatter + Allgatherv) is 2/3 of the old one (allreduce + Allgatherv).
"""

from __future__ import annotations

import math

import pytest

from tools.bench import alphabeta

ALPHA, BETA = 50e-6, 8e-9  # 50 us, 8 ns/B (1 Gbit/s)
BYTES = [4.0 * 2 ** k for k in (8, 12, 16, 18, 20, 22, 24)]


def test_fits_recover_an_exact_line() -> None:
    times = [ALPHA + b * BETA for b in BYTES]
    for fit in (alphabeta.fit_line, alphabeta.fit_relative):
        a, b = fit(BYTES, times)
        assert a == pytest.approx(ALPHA, rel=1e-6) and b == pytest.approx(BETA, rel=1e-9)


def test_relative_fit_keeps_alpha_when_the_largest_transfer_is_slow() -> None:
    times = [ALPHA + b * BETA for b in BYTES]
    times[-1] *= 2.0  # the largest exchange at half the rate
    plain_alpha, _ = alphabeta.fit_line(BYTES, times)
    alpha, beta = alphabeta.fit_relative(BYTES, times)
    assert plain_alpha < 0  # what the plain fit did on the measured data
    assert 0 < alpha < 2 * ALPHA and BETA < beta < 2 * BETA


def _constants(*, beta_shm: float) -> dict[str, float]:
    return {"alpha": ALPHA, "beta": BETA, "alpha_shm": 1e-6, "beta_shm": beta_shm}


def test_one_host_new_path_is_two_thirds_of_the_old() -> None:
    kw = {"n": 10 ** 6, "p": 8, "per_host": 8, "k": _constants(beta_shm=1e-10)}
    old = alphabeta.predict("allreduce", **kw) + alphabeta.predict("allgatherv", **kw)
    new = alphabeta.predict("reduce_scatter", **kw) + alphabeta.predict("allgatherv", **kw)
    assert new / old == pytest.approx(2 / 3)
    # Nothing crosses a cable: only shared memory's constants enter.
    assert alphabeta.predict("allgatherv", **kw) == pytest.approx(7 * (1e-6 + 4e6 / 8 * 1e-10))


def test_a_flat_ring_step_costs_its_slowest_link() -> None:
    n, p = 10 ** 6, 16
    slow_shm = _constants(beta_shm=10 * BETA)   # shared memory slower than the cable
    fast_shm = _constants(beta_shm=BETA / 10)
    ring = alphabeta.predict("allgatherv", n=n, p=p, per_host=8, k=slow_shm)
    assert ring == pytest.approx((p - 1) * (ALPHA + 4.0 * n / p * 10 * BETA))
    ring = alphabeta.predict("allgatherv", n=n, p=p, per_host=8, k=fast_shm)
    assert ring == pytest.approx((p - 1) * (ALPHA + 4.0 * n / p * BETA))
    # The node-aware form: one leader per host on the cable, shared memory inside.
    node = alphabeta.predict("node_allgatherv", n=n, p=p, per_host=8, k=fast_shm)
    intra = 2 * math.log2(8) * 1e-6 + 4.0 * n * BETA / 10 * (1 + 1 / 2)
    assert node == pytest.approx(intra + (ALPHA + 4.0 * n / 2 * BETA))
