"""Fixtures for program-sandbox tests: a real runner, a real Aer pipeline, real processes.

Sandboxes run as uids of their own when the tests run as root, so their cache
directory lives in a world-searchable temporary directory (pytest's own
tmp_path sits under a 0700 directory such a uid cannot enter, which matters
when the host refuses namespaces). A sandbox has a private /tmp, so a test
and a program synchronise through "gates" (`Gates`), not through files.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from qrelay._proto.v1 import backends_pb2, executor_pb2, types_pb2
from qrelay.executor.backends import load_backend
from qrelay.executor.pipeline import PrimitivePipeline
from qrelay.executor.programs import ProgramRunner, SandboxSettings
from qrelay.executor.transpile import TranspileCache
from qrelay.program import pack_program


@pytest.fixture(scope="session")
def pipeline() -> PrimitivePipeline:
    return PrimitivePipeline(load_backend("aer"), TranspileCache(64))


@pytest.fixture(scope="session")
def backend_info(pipeline: PrimitivePipeline) -> backends_pb2.BackendInfo:
    return pipeline.backend.info()


@pytest.fixture
def sandbox_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="qrelay-sandbox-test-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


class Events:
    """Collects what a program emits, in order."""

    def __init__(self) -> None:
        self.items: list[types_pb2.Interim | types_pb2.LogLine] = []
        self.changed = anyio.Event()

    async def __call__(self, item: types_pb2.Interim | types_pb2.LogLine) -> None:
        self.items.append(item)
        self.changed.set()
        self.changed = anyio.Event()

    @property
    def interims(self) -> list[str]:
        return [i.value_json for i in self.items if isinstance(i, types_pb2.Interim)]

    @property
    def logs(self) -> list[types_pb2.LogLine]:
        return [i for i in self.items if isinstance(i, types_pb2.LogLine)]

    async def wait_for(self, predicate: Callable[[], bool], limit: float = 30) -> None:
        with anyio.fail_after(limit):
            while not predicate():
                await self.changed.wait()


class Gates:
    """Named gates a program waits on: a primitive call with the option `test_gate`.

    In the program: `ctx.sampler({"test_gate": "go"}).run([qc], shots=1).result()`
    returns once the test calls `gates["go"].set()`.
    """

    def __init__(self, pipeline: PrimitivePipeline) -> None:
        self._pipeline = pipeline
        self.events: dict[str, anyio.Event] = {}

    def __getitem__(self, name: str) -> anyio.Event:
        return self.events.setdefault(name, anyio.Event())

    async def run_primitive(self, spec: types_pb2.JobSpec) -> types_pb2.JobResult:
        if "test_gate" in spec.options.fields:
            await self[spec.options.fields["test_gate"].string_value].wait()
            del spec.options.fields["test_gate"]
        return await anyio.to_thread.run_sync(self._pipeline.run, spec)


GATE = """
def gate(ctx, name):
    from qiskit import QuantumCircuit
    qc = QuantumCircuit(1)
    qc.measure_all()
    ctx.sampler({"test_gate": name}).run([qc], shots=1).result()
"""


@pytest.fixture
def gates(pipeline: PrimitivePipeline) -> Gates:
    return Gates(pipeline)


RunnerFactory = Callable[..., AbstractAsyncContextManager[ProgramRunner]]


@pytest.fixture
def make_runner(sandbox_root: Path, gates: Gates) -> RunnerFactory:
    """`async with make_runner(**settings) as runner:` — a started runner on real Aer.

    It runs programs on hosts that cannot isolate them too (allow_weak_sandbox):
    the isolation tests check the protections themselves.
    """

    @asynccontextmanager
    async def factory(**overrides: Any) -> AsyncIterator[ProgramRunner]:
        fields: dict[str, Any] = {
            "cache_dir": sandbox_root / "cache",
            # Cold sandboxes by default: a test running one job would otherwise
            # pay for a second interpreter (the replacement) it never uses.
            "warm_pool_size": 0,
            "wall_timeout_s": 60,
            "cpu_seconds": 60,
            "allow_weak_sandbox": True,
            **overrides,
        }
        async with ProgramRunner(SandboxSettings(**fields), gates.run_primitive) as runner:
            yield runner

    return factory


BundleFactory = Callable[..., executor_pb2.ProgramBundle]


@pytest.fixture
def make_bundle(tmp_path: Path) -> BundleFactory:
    """Pack a program from {relative path: source} the way a client uploads it."""

    def factory(
        files: dict[str, str],
        entry_point: str = "main:main",
        requirements: tuple[str, ...] = (),
        input_schema_json: str = "",
    ) -> executor_pb2.ProgramBundle:
        src = tmp_path / f"prog-{len(list(tmp_path.iterdir()))}"
        for rel, text in files.items():
            path = src / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text))
        archive = pack_program(src)
        return executor_pb2.ProgramBundle(
            id="p-" + hashlib.sha256(archive + entry_point.encode()).hexdigest()[:24],
            name="test",
            archive=archive,
            entry_point=entry_point,
            requirements=list(requirements),
            input_schema_json=input_schema_json,
        )

    return factory
