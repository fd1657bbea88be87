"""Program requirements: installed once per set (even by concurrent jobs), reused, errors shown."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import anyio
import pytest

from qrelay._proto.v1 import backends_pb2
from qrelay.executor.programs import ProgramFailed, _jail
from qrelay.values import decode_value
from tests.programs.conftest import BundleFactory, Events, RunnerFactory

INVALID_ARGUMENT = 3


def build_wheel(directory: Path, name: str, version: str, source: str) -> Path:
    """A minimal pure-Python wheel built by hand: local, no network, no build backend."""
    dist = f"{name}-{version}"
    files = {
        f"{name}/__init__.py": source.encode(),
        f"{dist}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        ).encode(),
        f"{dist}.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: qrelay-tests\n"
            b"Root-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = directory / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


async def test_requirement_is_installed_once_and_reused(
    make_runner: RunnerFactory,
    make_bundle: BundleFactory,
    backend_info: backends_pb2.BackendInfo,
    tmp_path: Path,
) -> None:
    wheel = build_wheel(tmp_path, "qrelaydemo", "1.2.3", "ANSWER = 42\n")
    bundle = make_bundle(
        {
            "main.py": """
            import qrelaydemo
            def main(ctx):
                return {"answer": qrelaydemo.ANSWER, "from": qrelaydemo.__file__}
            """
        },
        requirements=(str(wheel),),
    )
    results: list[object] = []
    async with make_runner(warm_pool_size=2) as runner:

        async def run(job_id: str) -> None:
            result = await runner.run(job_id, bundle, "", backend_info, Events())
            results.append(decode_value(result.program_json))

        # Two jobs with the same requirements at once: one pip run.
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "j-req-1")
            tg.start_soon(run, "j-req-2")
        await run("j-req-3")
        assert runner.environments.installs == 1
    assert len(results) == 3
    for value in results:
        assert isinstance(value, dict)
        assert value["answer"] == 42
        # The cached environment, mounted at its own path when sandboxes are isolated.
        assert value["from"].startswith(f"{_jail.ENV_DIR}/") or "/envs/" in value["from"]


async def test_qiskit_comes_from_the_executor_not_the_requirement_environment(
    make_runner: RunnerFactory,
    make_bundle: BundleFactory,
    backend_info: backends_pb2.BackendInfo,
    tmp_path: Path,
) -> None:
    import qiskit

    wheel = build_wheel(tmp_path, "qrelaydemo2", "0.1", "X = 1\n")
    bundle = make_bundle(
        {"main.py": "import qiskit\ndef main(ctx):\n    return qiskit.__version__\n"},
        requirements=(str(wheel),),
    )
    async with make_runner() as runner:
        result = await runner.run("j-qiskit", bundle, "", backend_info, Events())
        envs = list((runner.settings.cache_dir / "envs").iterdir())
    assert decode_value(result.program_json) == qiskit.__version__
    installed = {p.name for env in envs if env.is_dir() for p in env.iterdir()}
    assert not any(name.startswith("qiskit") for name in installed)


async def test_broken_requirement_fails_the_job_with_pips_message(
    make_runner: RunnerFactory,
    make_bundle: BundleFactory,
    backend_info: backends_pb2.BackendInfo,
    tmp_path: Path,
) -> None:
    missing = tmp_path / "nosuchpkg-1.0-py3-none-any.whl"
    bundle = make_bundle(
        {"main.py": "def main(ctx):\n    return 1\n"}, requirements=(str(missing),)
    )
    async with make_runner(warm_pool_size=0) as runner:
        with pytest.raises(ProgramFailed) as info:
            await runner.run("j-badreq", bundle, "", backend_info, Events())
        assert runner.pool.cold_starts == 0
    err = info.value.job_error
    assert err.code == INVALID_ARGUMENT
    assert err.message.startswith("installing requirements failed: ERROR:")
    assert "No such file or directory" in err.message
