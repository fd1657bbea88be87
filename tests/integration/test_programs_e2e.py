"""The VQE and QAOA examples, as programs and as client loops, agree with each other and the truth.

Same optimizer, seed (7 for VQE, 11 for QAOA, also the simulator seed) and
maxiter in every mode; the estimator's shot noise (default precision
1/64 ≈ 0.016 per evaluation) bounds how far an answer may drift.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from examples.qaoa import run_client_loop as qaoa_loop
from examples.qaoa import run_program as qaoa_program
from examples.vqe import run_client_loop as vqe_loop
from examples.vqe import run_program as vqe_program
from qrelay.client import QRelayService
from qrelay.testing import LocalStack

pytestmark = pytest.mark.slow

#: VQE: modes agree within 0.03 Ha (a few evaluations' shot noise); with
#: maxiter 30 COBYLA is within 0.1 Ha of the exact -1.857275 Ha.
VQE_MODES_TOL = 0.03
VQE_EXACT_TOL = 0.1


@pytest.fixture
def service(sync_stack: LocalStack) -> Iterator[QRelayService]:
    with QRelayService(sync_stack.address, timeout=30.0) as svc:
        yield svc


def test_vqe_program_and_client_loops_agree_with_the_exact_energy(service: QRelayService) -> None:
    kwargs = {"maxiter": 30, "seed": 7, "live": False}
    program = vqe_program.run(service, **kwargs)  # type: ignore[arg-type]
    loop = vqe_loop.run(service, **kwargs)  # type: ignore[arg-type]
    session = vqe_loop.run(service, session=True, **kwargs)  # type: ignore[arg-type]
    exact = program["exact"]
    assert exact == pytest.approx(-1.857275, abs=1e-5)
    for result in (program, loop, session):
        assert result["evaluations"] == 30
        assert abs(result["energy"] - exact) < VQE_EXACT_TOL
    assert abs(program["energy"] - loop["energy"]) < VQE_MODES_TOL
    assert abs(program["energy"] - session["energy"]) < VQE_MODES_TOL


def test_qaoa_program_and_client_loops_find_the_maximum_cut(service: QRelayService) -> None:
    kwargs = {"maxiter": 20, "seed": 11, "live": False}
    program = qaoa_program.run(service, **kwargs)  # type: ignore[arg-type]
    loop = qaoa_loop.run(service, **kwargs)  # type: ignore[arg-type]
    session = qaoa_loop.run(service, session=True, **kwargs)  # type: ignore[arg-type]
    for result in (program, loop, session):
        assert result["brute_force"] == 5
        assert result["best_cut"] == result["brute_force"]
        assert result["expected_cut"] > 3.0  # random assignment expects 3.0
    # expected cut from 20 noisy evaluations: modes agree within 0.3 edges
    assert abs(program["expected_cut"] - loop["expected_cut"]) < 0.3
    assert abs(program["expected_cut"] - session["expected_cut"]) < 0.3


def test_vqe_run_program_main_prints_the_comparison(
    sync_stack: LocalStack, capsys: pytest.CaptureFixture[str]
) -> None:
    vqe_program.main(sync_stack.address, maxiter=8)
    out = capsys.readouterr().out
    assert "VQE energy" in out
    assert "vs exact -1.85728 Ha" in out
