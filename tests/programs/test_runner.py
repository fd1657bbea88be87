"""ProgramRunner end to end: real sandbox processes, real Aer through the real pipeline."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import anyio
import numpy as np
import pytest

from qrelay._proto.v1 import backends_pb2, types_pb2
from qrelay.executor.programs import ProgramFailed
from qrelay.values import decode_value
from tests.programs.conftest import GATE, BundleFactory, Events, Gates, RunnerFactory

INVALID_ARGUMENT, UNKNOWN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED = 3, 2, 4, 8


def _live_processes_of(uid: int) -> list[int]:
    """Host pids of the processes (not zombies awaiting their reaper) whose real uid is `uid`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
            pids.append(int(entry.name))
    return pids


async def _wait_no_process_of(uid: int, limit: float = 5.0) -> None:
    with anyio.fail_after(limit):
        while _live_processes_of(uid):  # noqa: ASYNC110 - polling /proc, no event
            await anyio.sleep(0.02)


def _isolated(runner: object) -> bool:
    from qrelay.executor.programs import ProgramRunner

    assert isinstance(runner, ProgramRunner)
    return runner.isolation.complete


async def test_interim_results_arrive_in_order_while_program_runs(
    make_runner: RunnerFactory,
    make_bundle: BundleFactory,
    backend_info: backends_pb2.BackendInfo,
    gates: Gates,
) -> None:
    bundle = make_bundle(
        {
            "main.py": GATE
            + """
def main(ctx):
    for i in range(3):
        ctx.publish({"step": i})
    gate(ctx, "go")
    return "finished"
"""
        }
    )
    events = Events()
    result: list[types_pb2.JobResult] = []
    async with make_runner(warm_pool_size=1) as runner, anyio.create_task_group() as tg:

        async def run() -> None:
            result.append(await runner.run("j-interim", bundle, "", backend_info, events))

        tg.start_soon(run)
        await events.wait_for(lambda: len(events.interims) == 3)
        assert not result, "the program is still blocked, so no result yet"
        assert [decode_value(v) for v in events.interims] == [{"step": i} for i in range(3)]
        gates["go"].set()
    assert decode_value(result[0].program_json) == "finished"


async def test_return_value_is_the_result_with_qiskit_and_numpy_types(
    make_runner: RunnerFactory, make_bundle: BundleFactory, backend_info: backends_pb2.BackendInfo
) -> None:
    bundle = make_bundle(
        {
            "main.py": """
            import numpy as np
            from qiskit.quantum_info import SparsePauliOp
            def main(ctx, n, scale=1.0):
                return {
                    "array": np.arange(n) * scale,
                    "z": complex(1, -2),
                    "op": SparsePauliOp(["ZZ", "XI"], [0.5, -1.0]),
                    "backend": ctx.backend.name,
                    "target_qubits": ctx.backend.target.num_qubits,
                    "has_cx": "cx" in ctx.backend.target.operation_names,
                    "inputs": dict(ctx.inputs),
                }
            """
        }
    )
    async with make_runner() as runner:
        result = await runner.run("j-ret", bundle, '{"n": 4, "scale": 2.5}', backend_info, Events())
    value = decode_value(result.program_json)
    assert isinstance(value, dict)
    np.testing.assert_array_equal(value["array"], np.arange(4) * 2.5)
    assert value["z"] == complex(1, -2)
    assert value["op"].to_list() == [("ZZ", 0.5 + 0j), ("XI", -1.0 + 0j)]
    assert value["backend"] == backend_info.name
    assert value["target_qubits"] == backend_info.num_qubits
    assert value["has_cx"]
    assert value["inputs"] == {"n": 4, "scale": 2.5}


async def test_ctx_estimator_gives_correct_expectation_values(
    make_runner: RunnerFactory, make_bundle: BundleFactory, backend_info: backends_pb2.BackendInfo
) -> None:
    # Bell state: <ZZ> = <XX> = 1, <ZI> = 0. Tolerance 0.05 at precision 0.01
    # (5 sigma), seed_simulator 1234.
    bundle = make_bundle(
        {
            "main.py": """
            from qiskit import QuantumCircuit
            from qiskit.quantum_info import SparsePauliOp
            def main(ctx):
                qc = QuantumCircuit(2)
                qc.h(0)
                qc.cx(0, 1)
                est = ctx.estimator({"seed_simulator": 1234})
                obs = [SparsePauliOp("ZZ"), SparsePauliOp("XX"), SparsePauliOp("ZI")]
                res = est.run([(qc, obs)], precision=0.01).result()
                sampler = ctx.sampler({"seed_simulator": 1234})
                meas = qc.copy()
                meas.measure_all()
                counts = sampler.run([meas], shots=200).result()[0].data.meas.get_counts()
                ctx.log.info("evs %s", list(res[0].data.evs))
                return {"evs": res[0].data.evs, "counts": counts, "result": res}
            """
        }
    )
    async with make_runner() as runner:
        result = await runner.run("j-est", bundle, "{}", backend_info, Events())
    value = decode_value(result.program_json)
    assert isinstance(value, dict)
    np.testing.assert_allclose(value["evs"], [1.0, 1.0, 0.0], atol=0.05)
    assert set(value["counts"]) <= {"00", "11"}
    assert sum(value["counts"].values()) == 200
    np.testing.assert_allclose(value["result"][0].data.evs, value["evs"])


async def test_cancel_kills_a_busy_program_and_its_children(
    make_runner: RunnerFactory, make_bundle: BundleFactory, backend_info: backends_pb2.BackendInfo
) -> None:
    bundle = make_bundle(
        {
            "main.py": """
            import os, subprocess
            def main(ctx):
                child = subprocess.Popen(["sleep", "600"])
                ctx.publish({"uid": os.getuid(), "child": child.pid})
                while True:
                    pass
            """
        }
    )
    events = Events()
    async with make_runner(warm_pool_size=1) as runner:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(runner.run, "j-cancel", bundle, "{}", backend_info, events)
                await events.wait_for(lambda: bool(events.interims))
                pids = decode_value(events.interims[0])
                assert isinstance(pids, dict)
                started = time.monotonic()
                scope.cancel()
        elapsed = time.monotonic() - started
        if _isolated(runner):  # else the uid is the executor's or shared
            await _wait_no_process_of(pids["uid"])
        print(f"\ncancel -> run() returned in {elapsed * 1000:.1f} ms; sandbox and child gone")
        # The runner still works afterwards.
        ok = make_bundle({"main.py": "def main(ctx):\n    return 1\n"})
        assert (await runner.run("j-after", ok, "", backend_info, Events())).program_json == "1"


async def test_memory_limit_holds_and_says_so(
    make_runner: RunnerFactory, make_bundle: BundleFactory, backend_info: backends_pb2.BackendInfo
) -> None:
    bundle = make_bundle({"main.py": "def main(ctx):\n    return len(bytearray(2 << 30))\n"})
    async with make_runner(memory_mb=256) as runner:
        with pytest.raises(ProgramFailed) as info:
            await runner.run("j-mem", bundle, "", backend_info, Events())
    assert info.value.code == RESOURCE_EXHAUSTED
    assert "memory limit of 256 MB exceeded" in info.value.job_error.message


async def test_wall_time_limit_holds_and_says_so(
    make_runner: RunnerFactory, make_bundle: BundleFactory, backend_info: backends_pb2.BackendInfo
) -> None:
    bundle = make_bundle({"main.py": "import time\ndef main(ctx):\n    time.sleep(600)\n"})
    async with make_runner(wall_timeout_s=1.5) as runner:
        with pytest.raises(ProgramFailed) as info:
            await runner.run("j-wall", bundle, "", backend_info, Events())
    assert info.value.code == DEADLINE_EXCEEDED
    assert info.value.job_error.message == "wall-clock time limit of 1.5 s exceeded"


async def test_cpu_limit_holds_and_says_so(
    make_runner: RunnerFactory, make_bundle: BundleFactory, backend_info: backends_pb2.BackendInfo
) -> None:
    bundle = make_bundle({"main.py": "def main(ctx):\n    while True:\n        pass\n"})
    async with make_runner(cpu_seconds=1) as runner:
        with pytest.raises(ProgramFailed) as info:
            await runner.run("j-cpu", bundle, "", backend_info, Events())
    assert info.value.code == RESOURCE_EXHAUSTED
    assert info.value.job_error.message == "CPU time limit of 1 s exceeded"


async def test_failing_program_reports_only_the_users_traceback(
    make_runner: RunnerFactory, make_bundle: BundleFactory, backend_info: backends_pb2.BackendInfo
) -> None:
    bundle = make_bundle(
        {
            "main.py": """
            from pkg.helpers import check
            def main(ctx, x):
                return check(x)
            """,
            "pkg/__init__.py": "",
            "pkg/helpers.py": """
            def check(x):
                if x < 0:
                    raise ValueError(f"x must be non-negative, got {x}")
                return x
            """,
        }
    )
    async with make_runner() as runner:
        with pytest.raises(ProgramFailed) as info:
            await runner.run("j-raise", bundle, '{"x": -1}', backend_info, Events())
    err = info.value.job_error
    assert (err.code, err.type, err.message) == (
        UNKNOWN,
        "ValueError",
        "x must be non-negative, got -1",
    )
    text = "\n".join(err.traceback)
    assert 'File "main.py", line 4, in main' in text
    assert 'File "pkg/helpers.py", line 4, in check' in text
    assert "qrelay" not in text
    assert "_child" not in text


@pytest.mark.parametrize(
    ("entry_point", "message"),
    [
        ("nosuch:main", "entry point 'nosuch:main': module 'nosuch' not found in the program"),
        ("main:nosuch", "entry point 'main:nosuch': module 'main' has no function 'nosuch'"),
        ("main", "entry point must look like 'module:function', got 'main'"),
        (
            "json:main",
            "entry point 'json:main': the name 'json' is taken by a module the sandbox has "
            "already imported; rename the program's module",
        ),
    ],
)
async def test_bad_entry_point_is_a_clear_invalid_argument(
    make_runner: RunnerFactory,
    make_bundle: BundleFactory,
    backend_info: backends_pb2.BackendInfo,
    entry_point: str,
    message: str,
) -> None:
    bundle = make_bundle({"main.py": "def main(ctx):\n    return 1\n"}, entry_point=entry_point)
    async with make_runner(warm_pool_size=0) as runner:
        with pytest.raises(ProgramFailed) as info:
            await runner.run("j-entry", bundle, "", backend_info, Events())
    assert info.value.code == INVALID_ARGUMENT
    assert info.value.job_error.message == message


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            '{"n": "three"}',
            "inputs do not match the program's input schema at ['n']: "
            "'three' is not of type 'integer'",
        ),
        (
            "{}",
            "inputs do not match the program's input schema at (top level): "
            "'n' is a required property",
        ),
        ("[1, 2]", "inputs must be a JSON object of keyword arguments, got list"),
        (
            "{nope",
            "inputs are not valid JSON: Expecting property name enclosed in double quotes: "
            "line 1 column 2 (char 1)",
        ),
    ],
)
async def test_inputs_violating_the_schema_are_invalid_argument(
    make_runner: RunnerFactory,
    make_bundle: BundleFactory,
    backend_info: backends_pb2.BackendInfo,
    inputs: str,
    message: str,
) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    bundle = make_bundle(
        {"main.py": "def main(ctx, n):\n    return n\n"}, input_schema_json=json.dumps(schema)
    )
    async with make_runner(warm_pool_size=0) as runner:
        with pytest.raises(ProgramFailed) as info:
            await runner.run("j-schema", bundle, inputs, backend_info, Events())
        assert runner.pool.cold_starts == 0, "rejected before any sandbox starts"
    assert info.value.code == INVALID_ARGUMENT
    assert info.value.job_error.message == message


async def test_megabytes_of_logs_are_capped_with_a_note(
    make_runner: RunnerFactory, make_bundle: BundleFactory, backend_info: backends_pb2.BackendInfo
) -> None:
    bundle = make_bundle(
        {
            "main.py": """
            import sys
            def main(ctx):
                line = "x" * 1023
                for _ in range(3 * 1024):
                    print(line)
                    sys.stderr.write(line + "\\n")
                for _ in range(100):
                    ctx.log.info(line)
                return "done"
            """
        }
    )
    events = Events()
    limit = 64 * 1024
    async with make_runner(max_log_bytes=limit) as runner:
        result = await runner.run("j-logs", bundle, "", backend_info, events)
    assert result.program_json == '"done"'
    logs = events.logs
    assert sum(len(line.text.encode()) for line in logs[:-1]) <= limit
    assert logs[-1].text.startswith("log output truncated after ")
    assert {line.stream for line in logs[:-1]} <= {"stdout", "stderr", "log"}


async def test_fork_bomb_is_contained_and_cleaned_up(
    make_runner: RunnerFactory, make_bundle: BundleFactory, backend_info: backends_pb2.BackendInfo
) -> None:
    bundle = make_bundle(
        {
            "main.py": """
            import os, time
            def main(ctx):
                root, forks = os.getpid(), 0
                while True:
                    try:
                        pid = os.fork()
                    except OSError as exc:
                        if os.getpid() != root:
                            time.sleep(600)
                            os._exit(0)
                        return {"forks": forks, "error": type(exc).__name__, "uid": os.getuid()}
                    if pid and os.getpid() == root:
                        forks += 1
            """
        }
    )
    async with make_runner(max_processes=24) as runner:
        result = await runner.run("j-bomb", bundle, "", backend_info, Events())
        value = decode_value(result.program_json)
        assert isinstance(value, dict)
        assert value["error"] == "BlockingIOError"
        assert value["forks"] < 24
        if _isolated(runner):
            await _wait_no_process_of(value["uid"])
            assert _live_processes_of(value["uid"]) == []


async def test_publishing_an_unserialisable_object_fails_naming_the_type(
    make_runner: RunnerFactory, make_bundle: BundleFactory, backend_info: backends_pb2.BackendInfo
) -> None:
    bundle = make_bundle({"main.py": "def main(ctx):\n    ctx.publish({'x': [1, {2, 3}]})\n"})
    async with make_runner() as runner:
        with pytest.raises(ProgramFailed) as info:
            await runner.run("j-pub", bundle, "", backend_info, Events())
    err = info.value.job_error
    assert err.code == INVALID_ARGUMENT
    assert err.message == "cannot encode object of type set at path x[1]"
    assert err.type == "qrelay.errors.InvalidArgument"
    assert err.traceback
    assert 'File "main.py", line 2, in main' in err.traceback[-1]


async def test_unserialisable_return_value_fails_naming_the_type(
    make_runner: RunnerFactory, make_bundle: BundleFactory, backend_info: backends_pb2.BackendInfo
) -> None:
    bundle = make_bundle({"main.py": "def main(ctx):\n    return {'f': main}\n"})
    async with make_runner() as runner:
        with pytest.raises(ProgramFailed) as info:
            await runner.run("j-retbad", bundle, "", backend_info, Events())
    assert info.value.code == INVALID_ARGUMENT
    assert info.value.job_error.message == (
        "cannot encode the program's return value: cannot encode object of type function at path f"
    )


async def test_sandbox_crash_fails_the_job_not_the_executor(
    make_runner: RunnerFactory, make_bundle: BundleFactory, backend_info: backends_pb2.BackendInfo
) -> None:
    crash = make_bundle(
        {"main.py": "import os, signal\ndef main(ctx):\n    os.kill(os.getpid(), signal.SIGSEGV)\n"}
    )
    ok = make_bundle({"main.py": "def main(ctx):\n    return 'alive'\n"})
    async with make_runner() as runner:
        with pytest.raises(ProgramFailed) as info:
            await runner.run("j-crash", crash, "", backend_info, Events())
        assert info.value.code == UNKNOWN
        assert info.value.job_error.message.startswith("sandbox crashed with SIGSEGV")
        assert (await runner.run("j-ok", ok, "", backend_info, Events())).program_json == '"alive"'


async def test_sandbox_environment_is_scrubbed_and_unprivileged(
    make_runner: RunnerFactory,
    make_bundle: BundleFactory,
    backend_info: backends_pb2.BackendInfo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QRELAY_TOKEN", "s3cret-token")
    monkeypatch.setenv("QRELAY_BROKER", "broker.example:50051")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-s3cret")
    bundle = make_bundle(
        {
            "main.py": """
            import os
            def main(ctx):
                return {"env": dict(os.environ), "uid": os.getuid(), "cwd": os.getcwd()}
            """
        }
    )
    async with make_runner() as runner:
        result = await runner.run("j-env", bundle, "", backend_info, Events())
    value = decode_value(result.program_json)
    assert isinstance(value, dict)
    dumped = json.dumps(value["env"])
    assert "s3cret" not in dumped
    assert "broker.example" not in dumped
    assert not any(k.startswith("QRELAY") for k in value["env"])
    assert value["env"]["HOME"] == value["cwd"]
    if os.geteuid() == 0:
        assert 200_000 <= value["uid"] < 201_000, "a uid of the default range, not root"


async def test_warm_sandbox_runs_first_instruction_sooner_than_a_cold_one(
    make_runner: RunnerFactory, make_bundle: BundleFactory, backend_info: backends_pb2.BackendInfo
) -> None:
    bundle = make_bundle({"main.py": "import time\ndef main(ctx):\n    ctx.publish(time.time())\n"})

    async def first_instruction_delay(runner_kwargs: dict[str, int], runs: int) -> list[float]:
        delays = []
        async with make_runner(**runner_kwargs) as runner:
            await runner.pool.warmed()  # as on an executor idle since the last job
            for i in range(runs):
                events = Events()
                started = time.time()
                await runner.run(f"j-lat-{i}", bundle, "", backend_info, events)
                delays.append(float(decode_value(events.interims[0])) - started)  # type: ignore[arg-type]
                await runner.pool.warmed()
            if runner_kwargs["warm_pool_size"]:
                assert runner.pool.warm_starts == runs
            else:
                assert runner.pool.cold_starts == runs
        return delays

    warm = await first_instruction_delay({"warm_pool_size": 1}, 2)
    cold = await first_instruction_delay({"warm_pool_size": 0}, 1)
    print(
        f"\nrun() -> first instruction: warm {[round(d * 1000, 1) for d in warm]} ms, "
        f"cold {[round(d * 1000, 1) for d in cold]} ms"
    )


async def test_sandbox_that_dies_while_its_primitive_runs_fails_only_its_job(
    make_runner: RunnerFactory,
    make_bundle: BundleFactory,
    backend_info: backends_pb2.BackendInfo,
    gates: Gates,
) -> None:
    # The sandbox kills itself from a thread while its main thread waits for a
    # primitive; the answer then goes to a closed channel.
    bundle = make_bundle(
        {
            "main.py": GATE
            + """
import os, signal, threading
def main(ctx):
    ctx.publish(os.getuid())
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGKILL)).start()
    gate(ctx, "late")
"""
        }
    )
    events = Events()
    outcome: list[BaseException] = []
    async with make_runner() as runner:

        async def run() -> None:
            try:
                await runner.run("j-dies", bundle, "", backend_info, events)
            except ProgramFailed as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await events.wait_for(lambda: bool(events.interims))
            uid = decode_value(events.interims[0])
            assert isinstance(uid, int)
            if _isolated(runner):
                await _wait_no_process_of(uid)
            else:
                await anyio.sleep(1)  # no uid of its own to watch: give the kill time to land
            gates["late"].set()
        (failed,) = outcome
        assert isinstance(failed, ProgramFailed)
        assert failed.job_error.message.startswith("sandbox was killed (SIGKILL)")
        ok = make_bundle({"main.py": "def main(ctx):\n    return 1\n"})
        assert (await runner.run("j-next", ok, "", backend_info, Events())).program_json == "1"
