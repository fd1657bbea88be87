"""What a qrelay program sees: the `ctx` passed to its entry point.

A program's entry point is called as ``main(ctx, **inputs)`` inside the
executor's sandbox. ``ctx`` is a `ProgramContext`: primitives bound to the
executor's backend (through the executor's own pipeline, transpile cache
included, with no network hop), ``publish`` for interim results, ``log``,
the backend's description and the decoded inputs. See docs/programs.md.

The context talks to its host through the small `ProgramHost` protocol, so a
program author can also run ``main`` locally against any host they write.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from qrelay._proto.v1 import backends_pb2, types_pb2
from qrelay.errors import InvalidArgument
from qrelay.values import encode_value

if TYPE_CHECKING:
    from qiskit.primitives import PrimitiveResult
    from qiskit.transpiler import Target

__all__ = ["ProgramBackend", "ProgramContext", "ProgramHost", "ProgramLog", "pack_program"]


class ProgramHost(Protocol):
    """The sandbox side of the channel to the executor."""

    def run_primitive(self, spec: types_pb2.JobSpec) -> types_pb2.JobResult: ...

    def publish(self, value_json: str) -> None: ...

    def log(self, level: int, text: str) -> None: ...


@dataclass(frozen=True)
class ProgramBackend:
    """The backend the program runs beside: its name and target."""

    name: str
    num_qubits: int
    basis_gates: tuple[str, ...]
    coupling_map: tuple[tuple[int, int], ...]
    simulator: bool
    description: str = ""

    @classmethod
    def from_info(cls, info: backends_pb2.BackendInfo) -> ProgramBackend:
        return cls(
            name=info.name,
            num_qubits=info.num_qubits,
            basis_gates=tuple(info.basis_gates),
            coupling_map=tuple((e.control, e.target) for e in info.coupling_map),
            simulator=info.simulator,
            description=info.description,
        )

    @cached_property
    def target(self) -> Target:
        """A Qiskit Target with the backend's gates and connectivity (no error rates)."""
        from qiskit.circuit.library import get_standard_gate_name_mapping
        from qiskit.transpiler import CouplingMap, Target

        known = get_standard_gate_name_mapping()
        gates = [g for g in self.basis_gates if g in known]
        return Target.from_configuration(
            basis_gates=gates,
            num_qubits=self.num_qubits,
            coupling_map=CouplingMap(list(self.coupling_map)) if self.coupling_map else None,
        )


class ProgramLog:
    """Logger-like `ctx.log`: lines go to the job's log stream as "log"."""

    def __init__(self, host: ProgramHost) -> None:
        self._host = host

    def _emit(self, level: int, msg: object, args: tuple[object, ...]) -> None:
        text = str(msg) % args if args else str(msg)
        self._host.log(level, text)

    def debug(self, msg: object, *args: object) -> None:
        self._emit(types_pb2.LogLine.LEVEL_DEBUG, msg, args)

    def info(self, msg: object, *args: object) -> None:
        self._emit(types_pb2.LogLine.LEVEL_INFO, msg, args)

    def warning(self, msg: object, *args: object) -> None:
        self._emit(types_pb2.LogLine.LEVEL_WARNING, msg, args)

    warn = warning

    def error(self, msg: object, *args: object) -> None:
        self._emit(types_pb2.LogLine.LEVEL_ERROR, msg, args)

    def exception(self, msg: object, *args: object) -> None:
        self._emit(types_pb2.LogLine.LEVEL_ERROR, msg, args)


@dataclass
class ProgramContext:
    """The `ctx` argument of a program's entry point."""

    job_id: str
    backend: ProgramBackend
    inputs: Mapping[str, Any]
    _host: ProgramHost = field(repr=False)

    @cached_property
    def log(self) -> ProgramLog:
        return ProgramLog(self._host)

    def publish(self, value: object) -> None:
        """Send an interim result to the job's watchers (qrelay value encoding).

        Raises `qrelay.errors.InvalidArgument` naming the type and path of
        anything the encoding cannot carry.
        """
        self._host.publish(encode_value(value))

    def sampler(self, options: Mapping[str, Any] | None = None) -> Any:
        """A `BaseSamplerV2` running on this executor's backend."""
        from qrelay._program_primitives import LocalSampler

        return LocalSampler(self, dict(options or {}))

    def estimator(self, options: Mapping[str, Any] | None = None) -> Any:
        """A `BaseEstimatorV2` running on this executor's backend."""
        from qrelay._program_primitives import LocalEstimator

        return LocalEstimator(self, dict(options or {}))

    def _run(self, spec: types_pb2.JobSpec) -> PrimitiveResult:
        """Run one primitive task through the host and decode its result."""
        from qrelay import codec  # type: ignore[attr-defined,unused-ignore]

        spec.backend = self.backend.name
        result = self._host.run_primitive(spec)
        return codec.decode_primitive_result(result.primitive)  # type: ignore[no-any-return]


def pack_program(directory: str | os.PathLike[str]) -> bytes:
    """Deterministic tar.gz of a program directory (entries relative to it).

    Same files, same bytes: sorted entries, zeroed times and owners, modes
    normalised, caches and hidden files skipped; so the content hash that
    names a program depends on its source only.
    """
    root = Path(directory)
    if not root.is_dir():
        raise InvalidArgument(f"program directory {str(root)!r} does not exist")
    buf = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
                continue
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                continue
            info = tarfile.TarInfo(rel.as_posix())
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if path.is_dir():
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                data = path.read_bytes()
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
