"""Programs through the SDK against a real broker, executor and sandbox.

Each program here is a few lines written to tmp_path; they run in the
executor's real sandbox, so interim values, logs, cancellation and user
tracebacks travel the whole way: sandbox → executor → broker → Watch → SDK.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
from qiskit.providers import JobStatus

from qrelay.client import AsyncQRelayService, Program, QRelayService
from qrelay.errors import Cancelled, InvalidArgument, NotFound, QRelayError, ResourceExhausted
from qrelay.testing import LocalStack
from tests.conftest import owned_stack

COUNTER = """
def main(ctx, n=3, scale=1.0):
    for i in range(n):
        ctx.publish({"i": i, "value": i * scale})
        ctx.log.info("step %d", i)
    print("done printing")
    return {"total": sum(i * scale for i in range(n)), "n": n}
"""

SLOW = """
import time

def main(ctx):
    ctx.publish("started")
    while True:
        time.sleep(0.05)
"""

FAILING = """
def helper(x):
    raise ValueError(f"bad x: {x}")

def main(ctx, x=1):
    ctx.publish("before")
    return helper(x)
"""

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0}, "scale": {"type": "number"}},
    "additionalProperties": False,
}


def write_program(root: Path, source: str, name: str = "main.py") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(textwrap.dedent(source))
    return root


def test_upload_list_get_delete_with_versions_and_dedupe(
    service: QRelayService, tmp_path: Path
) -> None:
    src = write_program(tmp_path / "counter", COUNTER)
    first = service.upload_program(src, name="counter", description="counts")
    assert isinstance(first, Program)
    assert first.id.startswith("p-")
    assert (first.name, first.version, first.entry_point) == ("counter", 1, "main:main")
    assert first.description == "counts"
    assert first.size_bytes > 0

    again = service.upload_program(src, name="counter", description="counts")
    assert again.id == first.id  # same content, same program
    assert again.version == 1

    (src / "extra.py").write_text("X = 1\n")
    second = service.upload_program(src, name="counter", description="counts")
    assert second.id != first.id
    assert second.version == 2

    other = service.upload_program(write_program(tmp_path / "slow", SLOW), name="slow")
    newest = {p.name: p for p in service.programs()}
    assert newest["counter"].id == second.id
    assert newest["slow"].id == other.id
    assert [p.version for p in service.programs("counter")] == [2, 1]

    assert service.program("counter").id == second.id
    assert service.program(first.id).version == 1

    assert service.delete_program(second.id) == 1
    assert service.program("counter").id == first.id
    assert service.delete_program("counter") == 1
    with pytest.raises(NotFound, match="counter"):
        service.program("counter")
    assert [p.name for p in service.programs()] == ["slow"]


def test_upload_of_a_file_or_missing_path_is_invalid_before_sending(
    service: QRelayService, tmp_path: Path
) -> None:
    src = write_program(tmp_path / "p", COUNTER)
    with pytest.raises(InvalidArgument, match=r"must be a directory \(a file\)"):
        service.upload_program(src / "main.py", name="x")
    with pytest.raises(InvalidArgument, match=r"must be a directory \(missing\)"):
        service.upload_program(tmp_path / "nope", name="x")
    with pytest.raises(InvalidArgument, match="entry point module 'nomain' not found"):
        service.upload_program(src, name="x", entry_point="nomain:main")
    with pytest.raises(InvalidArgument, match="must look like 'module:function'"):
        service.upload_program(src, name="x", entry_point="main")
    with pytest.raises(InvalidArgument, match="requirements file"):
        service.upload_program(src, name="x", requirements=str(tmp_path / "none.txt"))
    assert service.programs() == []


def test_requirements_and_schema_files_are_read(service: QRelayService, tmp_path: Path) -> None:
    src = write_program(tmp_path / "p", COUNTER)
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("# pinned\n\nsix>=1.16  # tiny\n")
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object"}')
    program = service.upload_program(src, name="reqs", requirements=reqs, input_schema=schema)
    assert program.requirements == ("six>=1.16",)
    assert program.input_schema == {"type": "object"}


def test_run_streams_interims_in_order_and_returns_the_value(
    service: QRelayService, tmp_path: Path
) -> None:
    program = service.upload_program(write_program(tmp_path / "c", COUNTER), name="counter")
    job = service.run(program, {"n": 4, "scale": 0.5}, backend="aer", tags={"purpose": "test"})
    assert job.tags == {"purpose": "test"}
    interims = list(job.interim_results())
    assert interims == [{"i": i, "value": i * 0.5} for i in range(4)]
    assert job.result(timeout=60) == {"total": 3.0, "n": 4}
    assert job.status() is JobStatus.DONE
    logs = job.logs()
    assert [line for line in logs if line.startswith("step")] == [f"step {i}" for i in range(4)]
    assert "done printing" in logs
    # Nothing from the sandbox's own start-up (a SyntaxWarning from it once led every log).
    assert not [line for line in logs if "Warning" in line or "_jail" in line], logs


def test_late_subscriber_sees_every_interim_in_order(
    service: QRelayService, tmp_path: Path
) -> None:
    service.upload_program(write_program(tmp_path / "c", COUNTER), name="counter")
    job = service.run("counter", {"n": 5}, backend="aer")
    assert job.result(timeout=60)["n"] == 5
    late = service.job(job.job_id())
    assert [v["i"] for v in late.interim_results()] == [0, 1, 2, 3, 4]
    kinds = [ev.kind for ev in late.stream()]
    assert kinds.count("interim") == 5
    assert kinds[-1] == "state"


def test_numpy_inputs_reach_the_program(service: QRelayService, tmp_path: Path) -> None:
    source = """
    def main(ctx, values):
        return {"sum": float(values.sum()), "shape": list(values.shape)}
    """
    service.upload_program(write_program(tmp_path / "np", source), name="np")
    job = service.run("np", {"values": np.arange(6.0).reshape(2, 3)}, backend="aer")
    assert job.result(timeout=60) == {"sum": 15.0, "shape": [2, 3]}


def test_cancel_of_a_busy_program_ends_cancelled(service: QRelayService, tmp_path: Path) -> None:
    service.upload_program(write_program(tmp_path / "slow", SLOW), name="slow")
    job = service.run("slow", backend="aer")
    assert next(iter(job.interim_results())) == "started"  # the program is running
    job.cancel("enough")
    with pytest.raises(Cancelled, match="cancelled"):
        job.result(timeout=30)
    assert job.status() is JobStatus.CANCELLED


def test_failing_program_raises_with_the_users_traceback(
    service: QRelayService, tmp_path: Path
) -> None:
    service.upload_program(write_program(tmp_path / "f", FAILING), name="failing")
    job = service.run("failing", {"x": 42}, backend="aer")
    with pytest.raises(QRelayError, match="ValueError: bad x: 42") as info:
        job.result(timeout=60)
    assert info.value.code == 2  # UNKNOWN: an exception in user code
    notes = "".join(getattr(info.value, "__notes__", []))
    assert "main.py" in notes
    assert "helper" in notes
    assert 'raise ValueError(f"bad x: {x}")' in notes
    assert "qrelay/executor" not in notes  # never executor internals
    assert list(job.interim_results()) == ["before"]


def test_inputs_violating_the_schema_are_refused_at_submit(
    service: QRelayService, tmp_path: Path
) -> None:
    src = write_program(tmp_path / "c", COUNTER)
    service.upload_program(src, name="typed", input_schema=SCHEMA)
    with pytest.raises(InvalidArgument, match="'three' is not of type 'integer'"):
        service.run("typed", {"n": "three"}, backend="aer")
    with pytest.raises(InvalidArgument, match="schema"):
        service.run("typed", {"unknown": 1}, backend="aer")
    assert service.run("typed", {"n": 2}, backend="aer").result(timeout=60)["n"] == 2


def test_bad_run_arguments_are_invalid_before_sending(
    service: QRelayService, tmp_path: Path
) -> None:
    service.upload_program(write_program(tmp_path / "c", COUNTER), name="counter")
    with pytest.raises(InvalidArgument, match="inputs must be a dict"):
        service.run("counter", [1, 2], backend="aer")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="Python identifiers"):
        service.run("counter", {"not valid": 1}, backend="aer")
    with pytest.raises(InvalidArgument, match="run needs a backend"):
        service.run("counter", {"n": 1})
    with pytest.raises(InvalidArgument, match="object"):
        service.run("counter", {"n": object()}, backend="aer")
    with pytest.raises(InvalidArgument, match="program must be"):
        service.run("", backend="aer")
    with pytest.raises(NotFound):
        service.run("no-such-program", backend="aer")
    assert service.jobs(10) == []


async def test_async_service_uploads_and_runs(stack: LocalStack, tmp_path: Path) -> None:
    async with AsyncQRelayService(stack.address, timeout=20.0) as svc:
        program = await svc.upload_program(write_program(tmp_path / "c", COUNTER), "counter")
        job = await svc.run(program, {"n": 2}, backend="aer")
        seen = [v async for v in job.interim_results()]
        assert seen == [{"i": 0, "value": 0.0}, {"i": 1, "value": 1.0}]
        assert await job.result(timeout=60) == {"total": 1.0, "n": 2}
        assert [p.id for p in await svc.programs()] == [program.id]
        assert await svc.delete_program(program) == 1


async def test_program_over_the_size_limit_is_resource_exhausted(tmp_path: Path) -> None:
    src = write_program(tmp_path / "big", COUNTER)
    (src / "data.bin").write_bytes(np.random.default_rng(0).bytes(200_000))  # incompressible
    async with (
        owned_stack(executors=0, broker={"max_program_bytes": 50_000}) as env,
        AsyncQRelayService(env.address, timeout=20.0) as svc,
    ):
        with pytest.raises(ResourceExhausted, match="per program"):
            await svc.upload_program(src, "big")
        assert await svc.programs() == []


BAD_PRIMITIVE_INPUT = """
from qiskit import QuantumCircuit
from qiskit.quantum_info import SparsePauliOp

def _raised(call):
    try:
        call()
    except Exception as exc:
        name = type(exc).__name__
        return [name, isinstance(exc, ValueError), isinstance(exc, TypeError), str(exc)]
    return None

def main(ctx):
    qc = QuantumCircuit(1)
    qc.h(0)
    measured = qc.copy()
    measured.measure_all()
    sampler, estimator = ctx.sampler(), ctx.estimator()
    return {
        "shots_not_int": _raised(lambda: sampler.run([measured], shots=1.5).result()),
        "shots_negative": _raised(lambda: sampler.run([measured], shots=-1).result()),
        "unbracketed_pub": _raised(lambda: sampler.run(measured).result()),
        "precision_negative": _raised(
            lambda: estimator.run([(qc, SparsePauliOp("Z"))], precision=-1.0).result()
        ),
        "observable_too_wide": _raised(
            lambda: estimator.run([(qc, SparsePauliOp("ZZ"))]).result()
        ),
        "empty": sampler.run([]).result().__class__.__name__,
    }
"""


def test_programs_get_qiskits_exception_classes_from_their_primitives(
    service: QRelayService, tmp_path: Path
) -> None:
    """Bad primitive input inside a program raises what Qiskit's reference primitives raise."""
    program = service.upload_program(write_program(tmp_path / "bad", BAD_PRIMITIVE_INPUT))
    got = service.run(program, {}, backend="aer").result(timeout=120)
    assert got["empty"] == "PrimitiveResult"
    for case in ("shots_negative", "unbracketed_pub", "precision_negative", "observable_too_wide"):
        assert got[case] is not None, f"{case} raised nothing"
        assert got[case][1], f"{case}: {got[case]} is not a ValueError"
    assert got["shots_not_int"] is not None
    assert got["shots_not_int"][:3] == ["InvalidType", True, True], "a TypeError and a ValueError"
    assert "wrap it with `[]`" in got["unbracketed_pub"][3], "Qiskit's own message"
