"""Tenant isolation between program sandboxes, tried as an attacker would (real processes).

Tenant A's program runs on the executor, with a secret in its working
directory and a cached program of its own; while it runs, tenant B's program
tries one escape. Every escape must fail, and A's job must finish unharmed.
Programs wait on "gates": a primitive call with the option `test_gate` that
the executor side answers only when the test opens the gate, so no shared
directory is needed between test and sandboxes.

Each test asserts on states and counts, never on wall-clock times.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from qrelay._proto.v1 import backends_pb2
from qrelay.executor.programs import ProgramRunner, SandboxSettings
from qrelay.values import decode_value, encode_value
from tests.programs.conftest import GATE, BundleFactory, Events, Gates

SECRET = "tenant-A-secret-" + secrets.token_hex(6)

# Tenant A: secret file in its work dir, a recognisable process name, then it
# waits for the gate and proves it still works (threads, its own file).
PROGRAM_A = f"""
import ctypes, os, threading
SECRET = {SECRET!r}

def _gate(ctx, name):
    from qiskit import QuantumCircuit
    qc = QuantumCircuit(1)
    qc.measure_all()
    ctx.sampler({{"test_gate": name}}).run([qc], shots=1).result()

def main(ctx, name):
    ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)  # PR_SET_NAME: findable from the host
    with open("secret.txt", "w") as f:
        f.write(SECRET)
    ctx.publish({{"work_dir": os.getcwd(), "program_file": __file__, "uid": os.getuid()}})
    _gate(ctx, "A")
    release = threading.Event()
    threads = [threading.Thread(target=release.wait) for _ in range(8)]
    for t in threads:
        t.start()
    release.set()
    for t in threads:
        t.join()
    with open("secret.txt") as f:
        return {{"secret": f.read(), "threads": len(threads), "uid": os.getuid()}}
"""

# Tenant B: runs one attack, publishes what it saw, holds (threads, children)
# until its gate opens.
PROGRAM_B = """
import os, socket, signal, threading, time

def _gate(ctx, name):
    from qiskit import QuantumCircuit
    qc = QuantumCircuit(1)
    qc.measure_all()
    ctx.sampler({"test_gate": name}).run([qc], shots=1).result()

def _err(exc):
    return type(exc).__name__

def read_work_dir(ctx, a, env):
    out = {}
    for path in [os.path.join(a["work_dir"], "secret.txt")] + [
        f"/proc/{pid}/cwd/secret.txt" for pid in env["a_pids"]
    ] + [f"/proc/{pid}/root{a['work_dir']}/secret.txt" for pid in env["a_pids"]]:
        try:
            with open(path) as f:
                out[path] = f.read()
        except OSError as exc:
            out[path] = _err(exc)
    return out

def read_program(ctx, a, env):
    out = {}
    for path in [a["program_file"], env["a_cached_source"]]:
        try:
            with open(path) as f:
                out[path] = f.read()
        except OSError as exc:
            out[path] = _err(exc)
    for d in [env["programs_dir"], env["envs_dir"]]:
        try:
            out[d] = sorted(os.listdir(d))
        except OSError as exc:
            out[d] = _err(exc)
    return out

def read_cmdlines(ctx, a, env):
    texts = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    texts.append(f.read().replace(b"\\0", b" ").decode("utf-8", "replace"))
            except OSError:
                pass
    return {"pids_seen": len(texts), "cmdlines": texts}

def signal_a(ctx, a, env):
    out = {}
    for pid in env["a_pids"]:
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            try:
                os.kill(pid, sig)
                out[f"{pid}:{sig}"] = "sent"
            except OSError as exc:
                out[f"{pid}:{sig}"] = _err(exc)
    return out

def connect(ctx, a, env):
    out = {}
    for port in (env["broker_port"], 5432):
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
            out[str(port)] = "connected"
        except OSError as exc:
            out[str(port)] = _err(exc)
        finally:
            s.close()
    # Unix sockets of the host's services (PostgreSQL's, a database's, D-Bus ...)
    for top in ("/run", "/var/run", "/var/lib", env["socket_dir"]):
        for dirpath, _, names in os.walk(top):
            for name in names:
                path = os.path.join(dirpath, name)
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(path)
                    out[path] = "connected"
                except OSError as exc:
                    out[path] = _err(exc)
                finally:
                    s.close()
    return out

def leave_files(ctx, a, env):
    out = {}
    for d in ("/tmp", "/var/tmp", "/dev/shm", env["world_dir"]):
        path = os.path.join(d, env["marker"])
        try:
            with open(path, "w") as f:
                f.write("left behind")
            out[path] = "written"
        except OSError as exc:
            out[path] = _err(exc)
    return out

def big_file(ctx, a, env):
    chunk = b"x" * (8 << 20)
    written, error = 0, None
    try:
        with open("big.bin", "wb", buffering=0) as f:
            while written < (2 << 30):
                written += f.write(chunk)
    except OSError as exc:
        error = _err(exc)
    with open("big.bin", "wb"):
        pass  # truncate: free the space for the next part
    total, disk_error, n = 0, None, 0
    try:
        while total < (768 << 20):  # a cap, so a sandbox without a disk limit still ends
            with open(f"/tmp/fill-{n}.bin", "wb", buffering=0) as f:
                for _ in range(4):
                    total += f.write(chunk)
            n += 1
    except OSError as exc:
        disk_error = _err(exc)
    return {"written": written, "error": error, "disk_total": total, "disk_error": disk_error}

def many_threads(ctx, a, env):
    release = threading.Event()
    started, error = 0, None
    while started < 10000:
        try:
            threading.Thread(target=release.wait, daemon=True).start()
        except RuntimeError as exc:
            error = _err(exc)
            break
        started += 1
    return {"started": started, "error": error}

def fork_bomb(ctx, a, env):
    forks, error = 0, None
    while forks < 10000:
        try:
            pid = os.fork()
        except OSError as exc:
            error = _err(exc)
            break
        if pid == 0:
            time.sleep(600)
            os._exit(0)
        forks += 1
    return {"forks": forks, "error": error}

def main(ctx, attack, a, env):
    seen = globals()[attack](ctx, a, env)
    ctx.publish(seen)
    _gate(ctx, "B")
    return "done"
"""


def _proc_names() -> Iterator[tuple[int, str, str]]:
    """(pid, comm, cmdline) of every process the host sees."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        yield int(entry.name), comm, cmdline


def _pids_named(marker: str) -> list[int]:
    return [pid for pid, comm, cmdline in _proc_names() if marker in comm or marker in cmdline]


async def _wait_no_process(marker: str, limit: float = 10.0) -> list[int]:
    """Wait (bounded) until no process carries `marker`; the survivors if any."""
    with anyio.move_on_after(limit):
        while _pids_named(marker):  # noqa: ASYNC110 - polling /proc, no event
            await anyio.sleep(0.05)
    return _pids_named(marker)


def _kill_all(marker: str) -> None:
    for pid in _pids_named(marker):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def outside_tmp_root() -> Iterator[Path]:
    """A cache root outside /tmp, so hiding /tmp alone cannot pass the cache tests."""
    base = "/var/cache" if os.access("/var/cache", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="qrelay-isolation-", dir=base))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@asynccontextmanager
async def _runner(root: Path, gates: Gates, **overrides: Any) -> AsyncIterator[ProgramRunner]:
    fields: dict[str, Any] = {
        "cache_dir": root / "cache",
        "warm_pool_size": 0,
        "wall_timeout_s": 120,
        "cpu_seconds": 60,
        "max_processes": 32,
        "file_size_mb": 64,
        "disk_mb": 256,
        "allow_weak_sandbox": True,
        **overrides,
    }
    async with ProgramRunner(SandboxSettings(**fields), gates.run_primitive) as runner:
        if not runner.isolation.complete:
            pytest.skip(
                "this host cannot isolate sandboxes: " + "; ".join(runner.isolation.missing())
            )
        yield runner


ATTACKS = [
    "read_work_dir",
    "read_program",
    "read_cmdlines",
    "signal_a",
    "connect",
    "leave_files",
    "big_file",
    "many_threads",
    "fork_bomb",
]


@pytest.mark.parametrize("attack", ATTACKS)
async def test_tenant_b_cannot_escape_while_tenant_a_runs(
    attack: str,
    outside_tmp_root: Path,
    gates: Gates,
    backend_info: backends_pb2.BackendInfo,
    make_bundle: BundleFactory,
) -> None:
    marker = "qx" + secrets.token_hex(6)
    a_name = "qa" + secrets.token_hex(6)
    bundle_a = make_bundle({"main.py": PROGRAM_A})
    bundle_b = make_bundle({"main.py": PROGRAM_B})
    events_a, events_b = Events(), Events()
    results: dict[str, Any] = {}
    seen_by_listener = False
    world_dir = outside_tmp_root / "world-writable"
    world_dir.mkdir()
    world_dir.chmod(0o1777)
    places = ("/tmp", "/var/tmp", "/dev/shm", str(world_dir))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    unix_listener = socket.socket(socket.AF_UNIX)  # a service's socket in a world-open directory
    unix_listener.bind(str(world_dir / "service.sock"))
    os.chmod(world_dir / "service.sock", 0o777)
    unix_listener.listen()
    decoy = await anyio.open_process(  # stands in for a broker started with a token in argv
        [sys.executable, "-c", "import time; time.sleep(120)", f"--token=decoy-{marker}"]
    )
    try:
        async with _runner(outside_tmp_root, gates) as runner:

            async def run(name: str, bundle: Any, inputs: dict[str, Any], events: Events) -> None:
                try:
                    result = await runner.run(
                        f"j-{name}", bundle, encode_value(inputs), backend_info, events
                    )
                    results[name] = decode_value(result.program_json)
                except Exception as exc:  # noqa: BLE001 - recorded, asserted below
                    results[name] = exc

            async with anyio.create_task_group() as tg:
                tg.start_soon(run, "A", bundle_a, {"name": a_name}, events_a)
                await events_a.wait_for(lambda: bool(events_a.interims) or "A" in results, 120)
                assert events_a.interims, f"A did not start: {results.get('A')!r}"
                a = decode_value(events_a.interims[0])
                assert isinstance(a, dict)
                env = {
                    "a_pids": _pids_named(a_name),
                    "a_cached_source": str(runner.bundles.root / bundle_a.id / "main.py"),
                    "programs_dir": str(runner.bundles.root),
                    "envs_dir": str(runner.environments.root),
                    "broker_port": listener.getsockname()[1],
                    "marker": marker,
                    "world_dir": str(world_dir),
                    "socket_dir": str(outside_tmp_root),
                }
                assert env["a_pids"], "A's process is visible from the host"
                cached = await anyio.Path(env["a_cached_source"]).read_text()
                assert cached.count(SECRET) == 1, "A's program is cached where B is told"
                inputs_b = {"attack": attack, "a": a, "env": env}
                tg.start_soon(run, "B", bundle_b, inputs_b, events_b)
                await events_b.wait_for(lambda: bool(events_b.interims) or "B" in results, 120)
                seen = decode_value(events_b.interims[0]) if events_b.interims else results["B"]
                gates["A"].set()
                with anyio.fail_after(120):
                    while "A" not in results:  # noqa: ASYNC110 - set by the task above
                        await anyio.sleep(0.02)
                gates["B"].set()
            left_behind = [p for d in places if (p := Path(d, marker)).exists()]
            with contextlib.suppress(BlockingIOError):
                listener.accept()
                seen_by_listener = True
            with contextlib.suppress(BlockingIOError):
                listener.accept()
                seen_by_listener = True
    finally:
        listener.close()
        unix_listener.close()
        decoy.kill()
        await decoy.aclose()
        for d in places:
            await anyio.Path(d, marker).unlink(missing_ok=True)

    # A finished unharmed, whatever B tried.
    assert results["A"] == {"secret": SECRET, "threads": 8, "uid": a["uid"]}, results["A"]
    assert results["B"] == "done", results["B"]
    print(f"\n{attack}: B saw {json.dumps(seen)[:300]}")
    dumped = json.dumps(seen)
    assert SECRET not in dumped, "B read A's secret"
    if attack == "read_cmdlines":
        assert f"decoy-{marker}" not in dumped, "B read another process's argv"
        assert "pytest" not in dumped, "B read the executor's argv"
    elif attack == "read_program":
        assert isinstance(seen, dict)
        assert not isinstance(seen[env["programs_dir"]], list), "B listed the program cache"
        assert not isinstance(seen[env["envs_dir"]], list), "B listed the requirement cache"
    elif attack == "signal_a":
        assert "sent" not in dumped, "B could signal A's sandbox"
    elif attack == "connect":
        assert "connected" not in dumped, "B reached a port on the executor's loopback"
        assert not seen_by_listener
    elif attack == "leave_files":
        assert left_behind == [], "B's files outlived its job"
    elif attack == "big_file":
        assert isinstance(seen, dict)
        assert seen["error"] == "OSError", "file size limit (EFBIG)"
        assert seen["written"] <= 64 << 20
        assert seen["disk_error"] == "OSError", "disk limit (ENOSPC)"
        assert seen["disk_total"] <= 256 << 20
    elif attack == "many_threads":
        assert isinstance(seen, dict)
        assert seen["error"] == "RuntimeError", "can't start new thread"
        assert seen["started"] < 32
    elif attack == "fork_bomb":
        assert isinstance(seen, dict)
        assert seen["error"] == "BlockingIOError", "fork refused (EAGAIN)"
        assert seen["forks"] < 32


async def test_jobs_running_together_have_uids_of_their_own(
    outside_tmp_root: Path,
    gates: Gates,
    backend_info: backends_pb2.BackendInfo,
    make_bundle: BundleFactory,
) -> None:
    bundle = make_bundle(
        {
            "main.py": GATE
            + """
import os
def main(ctx):
    ctx.publish(os.getuid())
    gate(ctx, "all")
    return os.getuid()
"""
        }
    )
    events = [Events() for _ in range(3)]
    uids: list[object] = []
    async with (
        _runner(outside_tmp_root, gates, warm_pool_size=1) as runner,
        anyio.create_task_group() as tg,
    ):

        async def run(i: int) -> None:
            result = await runner.run(f"j{i}", bundle, "", backend_info, events[i])
            uids.append(decode_value(result.program_json))

        for i in range(3):
            tg.start_soon(run, i)
        for e in events:
            await e.wait_for(lambda e=e: bool(e.interims), 120)  # type: ignore[misc]
        gates["all"].set()
    lo, size = runner.settings.uid_range_start, runner.settings.uid_range_size
    assert len(set(uids)) == 3, uids
    assert all(isinstance(u, int) and lo <= u < lo + size for u in uids), uids


SPAWNER = """
import ctypes, os, subprocess, time
def main(ctx, marker, sleep_arg, hold):
    ctypes.CDLL(None).prctl(15, marker.encode(), 0, 0, 0)
    subprocess.Popen(["setsid", "sleep", sleep_arg])
    if os.fork() == 0:  # a double-forked daemon in a session of its own
        os.setsid()
        if os.fork() == 0:
            ctypes.CDLL(None).prctl(15, marker.encode(), 0, 0, 0)
            time.sleep(600)
        os._exit(0)
    ctx.publish("spawned")
    while hold:
        time.sleep(0.1)
    return "spawned"
"""


def _sleep_marker(marker: str) -> str:
    return "600." + str(int(marker[2:], 16))


async def test_setsid_grandchild_does_not_outlive_its_job(
    outside_tmp_root: Path,
    gates: Gates,
    backend_info: backends_pb2.BackendInfo,
    make_bundle: BundleFactory,
) -> None:
    marker = "qs" + secrets.token_hex(6)
    bundle = make_bundle({"main.py": SPAWNER})
    inputs = encode_value({"marker": marker, "sleep_arg": _sleep_marker(marker), "hold": False})
    try:
        async with _runner(outside_tmp_root, gates) as runner:
            result = await runner.run("j-setsid", bundle, inputs, backend_info, Events())
            assert decode_value(result.program_json) == "spawned"
            survivors = await _wait_no_process(marker)
            sleepers = await _wait_no_process(_sleep_marker(marker))
        assert survivors == [], "the double-forked daemon outlived its job"
        assert sleepers == [], "the setsid grandchild outlived its job"
    finally:
        _kill_all(marker)
        _kill_all(_sleep_marker(marker))


EXECUTOR_SCRIPT = """
import sys, anyio
from qrelay._proto.v1 import executor_pb2, types_pb2
from qrelay.executor.backends import load_backend
from qrelay.executor.programs import ProgramRunner, SandboxSettings

async def main(cache, archive, marker):
    async def run_primitive(spec):
        raise RuntimeError("no primitives here")
    async def emit(item):
        print("interim", flush=True)
    bundle = executor_pb2.ProgramBundle(
        id="p-killed", archive=open(archive, "rb").read(), entry_point="main:main"
    )
    settings = SandboxSettings(cache_dir=cache, warm_pool_size=1, allow_weak_sandbox=True)
    info = load_backend("aer").info()
    async with ProgramRunner(settings, run_primitive) as runner:
        inputs = '{"marker": "%s", "sleep_arg": "%s", "hold": true}' % (marker, sys.argv[4])
        await runner.run("j-killed", bundle, inputs, info, emit)

anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3])
"""


async def test_sigkilled_executor_leaves_no_sandbox_process(
    outside_tmp_root: Path, tmp_path: Path
) -> None:
    from qrelay.executor.programs.sandbox import Isolation
    from qrelay.program import pack_program

    (outside_tmp_root / "cache").mkdir()
    isolation = await Isolation.probe(SandboxSettings(cache_dir=outside_tmp_root / "cache"))
    if not isolation.complete:
        pytest.skip("this host cannot isolate sandboxes: " + "; ".join(isolation.missing()))
    marker = "qk" + secrets.token_hex(6)
    src = tmp_path / "spawner"
    src.mkdir()
    (src / "main.py").write_text(textwrap.dedent(SPAWNER))
    archive = tmp_path / "spawner.tar.gz"
    archive.write_bytes(pack_program(src))
    executor = await anyio.open_process(
        [
            sys.executable,
            "-c",
            EXECUTOR_SCRIPT,
            str(outside_tmp_root / "cache"),
            str(archive),
            marker,
            _sleep_marker(marker),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert executor.stdout is not None
        with anyio.fail_after(120):
            seen = b""
            while b"interim" not in seen:
                seen += await executor.stdout.receive()
        assert _pids_named(marker), "the program and its daemon run"
        # Every process of every sandbox (the idle one too) names its executor's pid.
        sandbox_mark = f'"parent": {executor.pid},'
        # Running: outer, init, worker, the forked daemon; idle: outer, init, worker.
        with anyio.fail_after(60):
            while len(_pids_named(sandbox_mark)) < 7:  # noqa: ASYNC110 - polling /proc
                await anyio.sleep(0.05)
        assert _pids_named(_sleep_marker(marker)), "the setsid grandchild runs"
        os.kill(executor.pid, signal.SIGKILL)
        await executor.wait()
        survivors = await _wait_no_process(marker)
        sleepers = await _wait_no_process(_sleep_marker(marker))
        sandboxes = await _wait_no_process(sandbox_mark)
        assert sandboxes == [], "a sandbox (running or idle) outlived the executor"
        assert survivors == [], "the program or its daemon outlived the executor"
        assert sleepers == [], "the setsid grandchild outlived the executor"
    finally:
        with contextlib.suppress(ProcessLookupError):
            executor.kill()
        await executor.aclose()
        _kill_all(marker)
        _kill_all(_sleep_marker(marker))


@pytest.mark.parametrize("root", [False, True], ids=["not-root", "root-no-namespaces"])
async def test_host_without_isolation_refuses_tenant_programs_unless_allowed(
    root: bool,
    sandbox_root: Path,
    gates: Gates,
    backend_info: backends_pb2.BackendInfo,
    make_bundle: BundleFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from qrelay.errors import FailedPrecondition
    from qrelay.executor.programs.sandbox import Isolation

    if root and os.geteuid() != 0:
        pytest.skip("a uid per sandbox needs a root executor")
    uids = range(200_500, 200_510) if root else None

    async def refused(cls: type[Isolation], settings: SandboxSettings) -> Isolation:
        return Isolation(uids, False, "the kernel refused namespaces (test)")

    monkeypatch.setattr(Isolation, "probe", classmethod(refused))
    settings = {"cache_dir": sandbox_root / "cache", "warm_pool_size": 0}
    runner = ProgramRunner(SandboxSettings(**settings), gates.run_primitive)
    with pytest.raises(FailedPrecondition) as info:
        await runner.start()
    await runner.aclose()
    message = info.value.message
    assert "tenant programs are refused" in message
    assert "allow_weak_sandbox" in message
    assert ("a uid per job" in message) is not root
    assert "the kernel refused namespaces (test)" in message
    assert "the network is reachable" in message

    # Told to, it runs them (as the previous, weaker sandbox did).
    weak = SandboxSettings(**settings, allow_weak_sandbox=True)
    async with ProgramRunner(weak, gates.run_primitive) as runner:
        bundle = make_bundle({"main.py": "import os\ndef main(ctx):\n    return os.getuid()\n"})
        result = await runner.run("j-weak", bundle, "", backend_info, Events())
    uid = decode_value(result.program_json)
    assert uid in uids if uids is not None else uid == os.getuid()
