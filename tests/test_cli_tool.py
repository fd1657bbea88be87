"""The `qrelay` command as a tool: fast start, lists and filters, results and logs, help,
errors worded for a command line, and tables that fit 80 columns.

A real `qrelay dev` (broker + aer/fake_manila executor) runs in its own
process for the module (see test_cli_programs for why not in this one);
commands run in-process through CliRunner, and as real processes where the
process itself is the point (what it imports, what a terminal of 80 columns
shows, that an error prints no traceback).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import structlog
import typer
from typer.testing import CliRunner

from qrelay._proto.v1 import jobs_pb2, jobs_pb2_grpc, types_pb2
from qrelay.cli import app
from tests.dev_process import qrelay_dev
from tests.integration.rawstubs import BELL_QASM3, TERMINAL, array, sampler_spec

runner = CliRunner()
JOB_ID = re.compile(r"j-[0-9a-f]{32}")
HEAVY = ("qiskit", "qiskit_aer", "qiskit_ibm_runtime")

PARAM_QASM3 = """OPENQASM 3.0;
include "stdgates.inc";
input float[64] theta;
qubit[1] q;
ry(theta) q[0];
"""

PROGRAM = """
import sys
import time


def main(ctx, pause=0.0):
    print("hello from stdout")
    ctx.log.info("step %d", 1)
    print("to stderr", file=sys.stderr)
    time.sleep(pause)
    ctx.log.warning("last line")
    return {"ok": True}
"""


@pytest.fixture(scope="module")
def dev_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`qrelay dev --port 0` (broker + aer/fake_manila executor); yields its address."""
    with qrelay_dev(tmp_path_factory.mktemp("dev")) as (address, _):
        yield address


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI configures structlog onto CliRunner's temporary stderr; undo that after."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def cli(address: str, *args: str) -> tuple[int, str]:
    # Restored here too, not only by the fixture: module fixtures call this first.
    saved = structlog.get_config()
    try:
        result = runner.invoke(
            app, ["--log-level", "warning", *args, "--broker", address], terminal_width=200
        )
    finally:
        structlog.configure(**saved)
    return result.exit_code, result.output


def qrelay_process(*args: str, columns: int = 200) -> subprocess.CompletedProcess[str]:
    """`qrelay ARGS` as a user runs it; stdout and stderr kept apart."""
    return subprocess.run(
        [sys.executable, "-m", "qrelay", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": str(columns), "QRELAY_LOG_LEVEL": "warning"},
    )


def submit(address: str, spec: types_pb2.JobSpec) -> str:
    with grpc.insecure_channel(address) as channel:
        job = jobs_pb2_grpc.JobServiceStub(channel).Submit(
            jobs_pb2.SubmitRequest(spec=spec), timeout=10
        )
    return job.id


def wait_final(address: str, job_id: str) -> jobs_pb2.Job:
    with grpc.insecure_channel(address) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        for event in stub.Watch(jobs_pb2.WatchRequest(job_id=job_id), timeout=120):
            if event.WhichOneof("payload") == "state" and event.state.state in TERMINAL:
                break
        return stub.Get(jobs_pb2.GetJobRequest(job_id=job_id), timeout=10)


def raw_result(address: str, job_id: str) -> types_pb2.JobResult:
    with grpc.insecure_channel(address) as channel:
        return jobs_pb2_grpc.JobServiceStub(channel).GetResult(
            jobs_pb2.GetResultRequest(job_id=job_id), timeout=10
        )


def estimator_spec() -> types_pb2.JobSpec:
    thetas = np.array([[0.0], [np.pi / 2], [np.pi]])
    pub = types_pb2.EstimatorPub(
        circuit=types_pb2.Circuit(qasm3=PARAM_QASM3),
        observables=types_pb2.ObservablesArray(
            elements=[types_pb2.Observable(paulis=["Z"], coeffs=[1.0])]
        ),
        parameter_values=types_pb2.Bindings(values=array(thetas), parameter_names=["theta"]),
    )
    task = types_pb2.EstimatorTask(pubs=[pub])
    task.precision = 0.01
    spec = types_pb2.JobSpec(backend="aer", estimator=task)
    spec.options.update({"seed_simulator": 7, "resilience_level": 0})
    return spec


@pytest.fixture(scope="module")
def bell_job(dev_address: str) -> str:
    """A DONE Sampler job: a Bell pair, 64 shots on the ideal simulator."""
    job_id = submit(dev_address, sampler_spec("aer", BELL_QASM3, shots=64))
    assert wait_final(dev_address, job_id).state == types_pb2.JOB_STATE_DONE
    return job_id


@pytest.fixture(scope="module")
def program_name(dev_address: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("prog")
    (root / "main.py").write_text(textwrap.dedent(PROGRAM))
    code, out = cli(dev_address, "programs", "upload", str(root), "--name", "talker")
    assert code == 0, out
    return "talker"


def run_program(address: str, name: str, pause: float = 0.0) -> str:
    code, out = cli(
        address,
        "programs",
        "run",
        name,
        "--backend",
        "aer",
        "--inputs",
        json.dumps({"pause": pause}),
    )
    assert code == 0, out
    match = JOB_ID.search(out)
    assert match, out
    return match.group(0)


# --- 1. fast start ---------------------------------------------------------------

IMPORT_PROBE = """
import runpy, sys
sys.argv = ["qrelay", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("qrelay", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else 1
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r} or m == "qrelay.codec")
print("IMPORTED:" + ",".join(heavy))
sys.exit(code)
"""


def test_broker_only_commands_never_import_qiskit(dev_address: str, bell_job: str) -> None:
    code, out = cli(dev_address, "sessions", "create", "--backend", "aer", "--quiet")
    assert code == 0, out
    session = out.strip()
    commands = [
        ["backends"],
        ["jobs", "list"],
        ["jobs", "list", "--state", "done", "--backend", "aer"],
        ["jobs", "show", bell_job],
        ["jobs", "result", bell_job, "--json"],
        ["jobs", "logs", bell_job],
        ["jobs", "cancel", bell_job],
        ["sessions", "list"],
        ["sessions", "show", session],
        ["sessions", "close", session],
        ["programs", "list"],
        ["programs", "show", "no-such-program"],
        ["programs", "delete", "no-such-program"],
    ]
    probe = IMPORT_PROBE.replace("{heavy!r}", repr(set(HEAVY)))
    for command in commands:
        done = subprocess.run(
            [sys.executable, "-c", probe, *command, "--broker", dev_address],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "QRELAY_LOG_LEVEL": "warning"},
        )
        assert "IMPORTED:" in done.stdout, (command, done.stdout, done.stderr)
        imported = done.stdout.rsplit("IMPORTED:", 1)[1].strip()
        assert imported == "", f"qrelay {' '.join(command)} imported {imported}"
        expected = 1 if command[-1] == "no-such-program" else 0
        assert done.returncode == expected, (command, done.stdout, done.stderr)


def test_the_cli_package_imports_without_qiskit() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, qrelay.cli, qrelay.client, qrelay.cli._broker, qrelay.cli._results; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {set(HEAVY)!r}))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --- 2, 3. sessions list, jobs list filters --------------------------------------


def ids(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.strip()]


def test_sessions_list_shows_the_callers_sessions_filtered(dev_address: str) -> None:
    code, first = cli(dev_address, "sessions", "create", "--backend", "aer", "-q")
    assert code == 0, first
    code, second = cli(
        dev_address, "sessions", "create", "--backend", "fake_manila", "--batch", "-q"
    )
    assert code == 0, second
    first, second = first.strip(), second.strip()
    code, out = cli(dev_address, "sessions", "close", first)
    assert code == 0, out

    code, out = cli(dev_address, "sessions", "list", "-q")
    assert code == 0, out
    listed = ids(out)
    assert listed.index(second) < listed.index(first), "newest first"
    code, out = cli(dev_address, "sessions", "list", "-q", "--state", "closed")
    assert first in ids(out)
    assert second not in ids(out)
    code, out = cli(dev_address, "sessions", "list", "-q", "--backend", "fake_manila")
    assert second in ids(out)
    assert first not in ids(out)
    code, out = cli(dev_address, "sessions", "list", "-q", "--limit", "1")
    assert ids(out) == [listed[0]]
    code, table = cli(dev_address, "sessions", "list")
    assert code == 0, table
    assert second in table
    assert "batch" in table
    code, out = cli(dev_address, "sessions", "list", "--state", "sleepy")
    assert code == 2
    assert "--state 'sleepy' is not a session state" in out


def test_jobs_list_filters_by_session_program_state_and_backend(
    dev_address: str, bell_job: str, program_name: str
) -> None:
    code, out = cli(dev_address, "sessions", "create", "--backend", "aer", "-q")
    assert code == 0, out
    session = out.strip()
    spec = sampler_spec("aer", BELL_QASM3, shots=16)
    spec.session_id = session
    in_session = submit(dev_address, spec)
    on_manila = submit(dev_address, sampler_spec("fake_manila", BELL_QASM3, shots=16))
    program_job = run_program(dev_address, program_name)
    failing = submit(dev_address, sampler_spec("aer", "OPENQASM 3.0;\nnot qasm;\n"))
    for job_id in (in_session, on_manila, program_job, failing):
        wait_final(dev_address, job_id)

    def listed(*flags: str) -> list[str]:
        code, out = cli(dev_address, "jobs", "list", "-q", "--limit", "200", *flags)
        assert code == 0, out
        return ids(out)

    assert listed("--session", session) == [in_session]
    assert listed("--program", program_name) == [program_job]
    assert on_manila in listed("--backend", "fake_manila")
    assert in_session not in listed("--backend", "fake_manila")
    failed = listed("--state", "failed")
    assert failing in failed
    assert bell_job not in failed
    both = listed("--state", "failed", "--state", "done")
    assert {failing, bell_job, in_session} <= set(both)
    assert listed("--state", "error") == failed, "Qiskit's name for FAILED works too"
    assert listed("--session", session, "--state", "failed") == []
    code, out = cli(dev_address, "jobs", "list", "--session", session)
    assert in_session in out, "ids are whole in the table"
    code, out = cli(dev_address, "jobs", "list", "--state", "lost")
    assert code == 2
    assert "--state 'lost' is not a job state" in out


# --- 4. results and logs ------------------------------------------------------------


def test_jobs_result_json_matches_qiskits_own_decoding(dev_address: str, bell_job: str) -> None:
    from qrelay.codec import decode_primitive_result

    code, out = cli(dev_address, "jobs", "result", bell_job, "--json")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["job_id"] == bell_job
    assert doc["kind"] == "sampler"
    (pub,) = doc["pubs"]
    (name,) = pub["data"]
    field = pub["data"][name]
    assert field["kind"] == "bits"
    assert field["num_shots"] == 64
    assert field["num_bits"] == 2
    expected = decode_primitive_result(raw_result(dev_address, bell_job).primitive)
    assert field["counts"] == expected[0].data[name].get_counts()
    assert set(field["counts"]) <= {"00", "11"}  # a Bell pair on the ideal simulator

    code, human = cli(dev_address, "jobs", "result", bell_job)
    assert code == 0, human
    assert "pub 0" in human
    assert f"{name}: 64 shots, 2 bits" in human
    for bitstring, count in field["counts"].items():
        assert f"{bitstring}: {count}" in human


def test_jobs_result_of_an_estimator_job_gives_values_and_stds(dev_address: str) -> None:
    job_id = submit(dev_address, estimator_spec())
    assert wait_final(dev_address, job_id).state == types_pb2.JOB_STATE_DONE
    code, out = cli(dev_address, "jobs", "result", job_id, "--json")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["kind"] == "estimator"
    data = doc["pubs"][0]["data"]
    assert data["evs"]["kind"] == "array"
    assert data["evs"]["shape"] == [3]
    assert data["stds"]["shape"] == [3]
    # <Z> after ry(theta) is cos(theta); precision 0.01 -> 5 sigma = 0.05.
    np.testing.assert_allclose(data["evs"]["values"], [1.0, 0.0, -1.0], atol=0.05)
    assert all(s >= 0 for s in data["stds"]["values"])
    code, human = cli(dev_address, "jobs", "result", job_id)
    assert code == 0, human
    assert "evs: shape [3]" in human
    assert "stds: shape [3]" in human


def test_jobs_result_of_a_failed_or_unfinished_job_exits_1_saying_why(
    dev_address: str, program_name: str
) -> None:
    failing = submit(dev_address, sampler_spec("aer", "OPENQASM 3.0;\nnot qasm;\n"))
    wait_final(dev_address, failing)
    code, out = cli(dev_address, "jobs", "result", failing)
    assert code == 1
    assert "FAILED" in out
    assert "INVALID_ARGUMENT" in out
    slow = run_program(dev_address, program_name, 30.0)
    code, out = cli(dev_address, "jobs", "result", slow)
    assert code == 1
    assert "has no result yet" in out
    code, out = cli(dev_address, "jobs", "cancel", slow)
    assert code == 0, out
    code, out = cli(dev_address, "jobs", "result", "j-" + "0" * 32)
    assert code == 1
    assert "NOT_FOUND" in out


def test_program_result_json_is_its_value(dev_address: str, program_name: str) -> None:
    job_id = run_program(dev_address, program_name)
    wait_final(dev_address, job_id)
    code, out = cli(dev_address, "jobs", "result", job_id, "--json")
    assert code == 0, out
    assert json.loads(out) == {
        "job_id": job_id,
        "kind": "program",
        "backend": "aer",
        "value": {"ok": True},
    }


def test_jobs_logs_prints_a_programs_lines_in_order(dev_address: str, program_name: str) -> None:
    job_id = run_program(dev_address, program_name)
    wait_final(dev_address, job_id)
    code, out = cli(dev_address, "jobs", "logs", job_id)
    assert code == 0, out
    lines = [line for line in out.splitlines() if line.strip()]
    # stdout and ctx.log arrive on different pipes: their relative order is the
    # executor's; each stream's own order is kept.
    assert "hello from stdout" in lines
    assert "to stderr" in lines
    assert lines.index("step 1") < lines.index("last line")
    code, prefixed = cli(dev_address, "jobs", "logs", job_id, "--prefix")
    assert code == 0, prefixed
    assert re.search(r"\d\d:\d\d:\d\d stdout +hello from stdout", prefixed)
    assert re.search(r"log:warning +last line", prefixed)
    assert re.search(r"stderr +to stderr", prefixed)


def test_jobs_logs_follow_keeps_reading_until_the_job_ends(
    dev_address: str, program_name: str
) -> None:
    job_id = run_program(dev_address, program_name, 3.0)
    # Without --follow: the lines so far, and back while the job still runs.
    code, out = cli(dev_address, "jobs", "logs", job_id)
    assert code == 0, out
    assert "last line" not in out
    with grpc.insecure_channel(dev_address) as channel:
        job = jobs_pb2_grpc.JobServiceStub(channel).Get(
            jobs_pb2.GetJobRequest(job_id=job_id), timeout=10
        )
    assert job.state not in TERMINAL, "the job outlived the first `jobs logs`"
    code, out = cli(dev_address, "jobs", "logs", job_id, "--follow")
    assert code == 0, out
    assert "hello from stdout" in out
    assert "last line" in out
    assert wait_final(dev_address, job_id).state == types_pb2.JOB_STATE_DONE


# --- 5. backends ------------------------------------------------------------------


def test_backends_marks_online_and_available_ones(dev_address: str) -> None:
    from qrelay.cli._catalog import FAKE_DEVICES

    code, out = cli(dev_address, "backends")
    assert code == 0, out
    rows = {
        line.split()[0]: line
        for line in out.splitlines()
        if line.strip().startswith(("aer", "fake"))
    }
    assert "online" in rows["aer"]
    assert "online" in rows["fake_manila"]
    assert "available" in rows["fake_sherbrooke"]
    assert set(FAKE_DEVICES) <= set(rows)
    assert "available when an executor serves it" in out
    code, online = cli(dev_address, "backends", "--online-only")
    assert code == 0, online
    assert "fake_manila" in online
    assert "fake_sherbrooke" not in online


def test_the_servable_backend_table_matches_the_installed_fake_provider() -> None:
    """cli/_catalog.py is generated (scripts/gen_backend_catalog.py); rerun it when this fails."""
    from qiskit_ibm_runtime import fake_provider
    from qiskit_ibm_runtime.fake_provider.fake_backend import FakeBackendV2

    from qrelay.cli._catalog import FAKE_DEVICES, IDEAL
    from qrelay.executor.backends import BUILT_IN

    built_in = [name for provider in BUILT_IN for name in provider.names()]
    assert [IDEAL, *FAKE_DEVICES] == built_in
    found = {}
    for attr in dir(fake_provider):
        cls = getattr(fake_provider, attr)
        if isinstance(cls, type) and issubclass(cls, FakeBackendV2) and cls is not FakeBackendV2:
            name = getattr(cls, "backend_name", "")
            if name.startswith("fake_"):
                conf = Path(cls.dirname) / cls.conf_filename
                found[name] = json.loads(conf.read_text())["n_qubits"]
    assert found == FAKE_DEVICES
    assert FAKE_DEVICES["fake_manila"] == 5


# --- 6. help -------------------------------------------------------------------------


def every_command(group: object, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, command in getattr(group, "commands", {}).items():
        yield from every_command(command, (*path, name))


CLIENT_COMMANDS = {
    ("backends",),
    ("jobs", "list"),
    ("jobs", "show"),
    ("jobs", "result"),
    ("jobs", "logs"),
    ("jobs", "cancel"),
    ("jobs", "watch"),
    ("sessions", "create"),
    ("sessions", "list"),
    ("sessions", "show"),
    ("sessions", "close"),
    ("sessions", "cancel"),
    ("programs", "upload"),
    ("programs", "list"),
    ("programs", "show"),
    ("programs", "delete"),
    ("programs", "run"),
}


def test_help_names_defaults_and_env_vars_without_type_placeholders() -> None:
    commands = list(every_command(typer.main.get_command(app)))
    assert set(commands) >= CLIENT_COMMANDS
    for command in commands:
        result = runner.invoke(app, [*command, "--help"], terminal_width=200)
        assert result.exit_code == 0, (command, result.output)
        text = result.output
        assert "<bool>" not in text, command
        assert "<list" not in text, command
        if command in CLIENT_COMMANDS:
            assert "--broker" in text, command
            assert "QRELAY_BROKER" in text, command
            assert "[default: 127.0.0.1:50051]" in text, command
            assert "QRELAY_TOKEN_FILE" in text, command
    listing = runner.invoke(app, ["jobs", "list", "--help"], terminal_width=200).output
    assert "[default: 20]" in listing
    assert "--state" in listing
    assert "STATE" in listing
    top = runner.invoke(app, ["--help"], terminal_width=200).output
    assert "QRELAY_LOG_LEVEL" in top
    assert "QRELAY_LOG_JSON" in top


def test_server_help_shows_each_settings_default_and_env_var() -> None:
    """Read from the settings classes, so help and behaviour cannot drift apart."""
    from qrelay.broker.settings import BrokerSettings
    from qrelay.executor.settings import ExecutorSettings

    broker = runner.invoke(app, ["broker", "serve", "--help"], env={"COLUMNS": "250"}).output
    assert "[env var: QRELAY_LISTEN]" in broker
    assert f"[default: ({BrokerSettings().listen})]" in broker
    assert "[env var: QRELAY_LEASE_TTL_S]" in broker
    assert f"[default: ({BrokerSettings().lease_ttl_s})]" in broker
    assert "[env var: QRELAY_DB_PATH]" in broker
    executor = runner.invoke(app, ["executor", "serve", "--help"], env={"COLUMNS": "250"}).output
    assert "[env var: QRELAY_EXECUTOR_SLOTS]" in executor
    assert f"[default: ({ExecutorSettings().slots})]" in executor
    assert "[env var: QRELAY_EXECUTOR_BACKENDS]" in executor
    assert "[env var: QRELAY_EXECUTOR_MAX_RUN_TIME_S]" in executor
    # A flag whose help already says where it comes from keeps its own words.
    assert "QRELAY_EXECUTOR_BROKER or QRELAY_BROKER" in executor


# --- 7. sessions create --quiet ------------------------------------------------------


def test_sessions_create_quiet_prints_only_the_id(dev_address: str) -> None:
    done = qrelay_process(
        "sessions", "create", "--backend", "aer", "--quiet", "--broker", dev_address
    )
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"s-[0-9a-f]{32}\n", done.stdout), done.stdout
    code, out = cli(dev_address, "sessions", "show", done.stdout.strip())
    assert code == 0, out
    assert "OPEN" in out


# --- 8. errors worded for the CLI ------------------------------------------------------


def closed_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens once it is closed


@pytest.mark.parametrize(
    "command",
    [["jobs", "list"], ["backends"], ["sessions", "list"], ["jobs", "logs", "j-x"]],
    ids=" ".join,
)
def test_an_unreachable_broker_is_named_with_a_hint_and_no_traceback(command: list[str]) -> None:
    address = closed_port()
    done = qrelay_process(*command, "--broker", address)
    assert done.returncode == 1
    assert f"no broker answers at {address}" in done.stderr
    assert "qrelay dev" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert "UNAVAILABLE" not in done.stderr


def test_errors_name_the_flags_not_sdk_arguments_or_rpcs(
    dev_address: str, program_name: str
) -> None:
    code, out = cli(dev_address, "programs", "run", program_name)
    assert code == 2
    assert "--backend" in out
    assert "--session" in out
    assert "mode=" not in out
    code, session = cli(dev_address, "sessions", "create", "--backend", "aer", "-q")
    code, out = cli(
        dev_address,
        "programs",
        "run",
        program_name,
        "--session",
        session.strip(),
        "--backend",
        "fake_manila",
    )
    assert code == 2
    assert "--backend fake_manila differs from aer, the backend of --session" in out
    assert "mode=" not in out
    code, out = cli(dev_address, "sessions", "create", "--backend", "aer", "--max-time", "soon")
    assert code == 1
    assert "--max-time must be seconds or a string like '1h 30m'" in out
    code, out = cli(dev_address, "jobs", "show", "j-[not]-an-id")
    assert code == 1
    assert "j-[not]-an-id" in out, "markup-like text in messages prints as it is"
    assert "GetJob" not in out


# --- 9. 80 columns ------------------------------------------------------------------------


def test_tables_fit_80_columns_and_keep_job_ids_whole(
    dev_address: str, bell_job: str, program_name: str
) -> None:
    code, session = cli(dev_address, "sessions", "create", "--backend", "fake_manila", "-q")
    assert code == 0, session
    commands = [
        ["backends"],
        ["jobs", "list", "--limit", "50"],
        ["jobs", "show", bell_job],
        ["jobs", "result", bell_job],
        ["sessions", "list"],
        ["sessions", "show", session.strip()],
        ["programs", "list"],
        ["programs", "show", program_name],
    ]
    for command in commands:
        done = qrelay_process(*command, "--broker", dev_address, columns=80)
        assert done.returncode == 0, (command, done.stderr)
        lines = done.stdout.splitlines()
        assert lines, command
        wide = [line for line in lines if len(line) > 80]
        assert not wide, (command, wide)
        if command[:2] == ["jobs", "list"]:
            assert bell_job in done.stdout, "job ids stay whole on one line"
        if command[0] == "sessions" and command[1] == "list":
            assert session.strip() in done.stdout
