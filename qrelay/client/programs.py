"""Programs as the SDK shows them: `Program` and the upload request builder.

Shaped like qiskit-ibm-runtime's old `upload_program` and Qiskit Serverless's
`QiskitFunction`: a directory of Python files, an entry point
``module:function``, optional pip requirements and an optional JSON Schema for
the inputs. Everything that can be checked without the broker (the directory
exists, the entry module is in it, requirements and schema parse) is checked
here, so a typo fails before a possibly large archive is sent.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeAlias

from qrelay._proto.v1 import programs_pb2
from qrelay.errors import InvalidArgument
from qrelay.program import pack_program

PathLike: TypeAlias = str | os.PathLike[str]
#: A list of requirement lines, or the path of a requirements.txt.
RequirementsLike: TypeAlias = Sequence[str] | PathLike | None
#: A JSON Schema as a dict, or the path of a .json file holding one.
SchemaLike: TypeAlias = Mapping[str, Any] | PathLike | None

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_ENTRY_POINT = re.compile(rf"^({_IDENT}(?:\.{_IDENT})*):({_IDENT})$")


@dataclass(frozen=True)
class Program:
    """One stored version of a program (ProgramService's `Program`)."""

    id: str
    name: str
    entry_point: str
    requirements: tuple[str, ...]
    input_schema: dict[str, Any] | None
    description: str
    size_bytes: int
    version: int
    created_at: datetime | None

    @property
    def program_id(self) -> str:
        """The id, under qiskit-ibm-runtime's name for it."""
        return self.id

    @classmethod
    def from_proto(cls, p: programs_pb2.Program) -> Program:
        schema = json.loads(p.input_schema_json) if p.input_schema_json else None
        return cls(
            id=p.id,
            name=p.name,
            entry_point=p.entry_point,
            requirements=tuple(p.requirements),
            input_schema=schema,
            description=p.description,
            size_bytes=p.size_bytes,
            version=p.version,
            created_at=p.created_at.ToDatetime() if p.HasField("created_at") else None,
        )

    def __str__(self) -> str:
        return f"{self.name} v{self.version} ({self.id})"


def program_ref(program: Program | str) -> str:
    """The id or name the wire wants for `program`."""
    if isinstance(program, Program):
        return program.id
    if isinstance(program, str) and program.strip():
        return program.strip()
    raise InvalidArgument(f"program must be a Program, an id or a name, got {program!r}")


def _check_entry_point(root: Path, entry_point: str) -> None:
    match = _ENTRY_POINT.match(entry_point)
    if match is None:
        raise InvalidArgument(
            f"entry_point must look like 'module:function' (e.g. 'main:main'), got {entry_point!r}"
        )
    parts = match.group(1).split(".")
    module = root.joinpath(*parts)
    if not (module.with_suffix(".py").is_file() or (module / "__init__.py").is_file()):
        raise InvalidArgument(
            f"entry point module {match.group(1)!r} not found in {str(root)!r} "
            f"(expected {'/'.join(parts)}.py)"
        )


def _requirement_lines(requirements: RequirementsLike) -> list[str]:
    if requirements is None:
        return []
    if isinstance(requirements, str | os.PathLike):
        path = Path(requirements)
        if not path.is_file():
            raise InvalidArgument(
                f"requirements must be a list of lines or a requirements file; "
                f"{str(path)!r} is not a file"
            )
        text = path.read_text(encoding="utf-8")
        lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
        return [line for line in lines if line]
    lines = []
    for i, line in enumerate(requirements):
        if not isinstance(line, str):
            raise InvalidArgument(f"requirements[{i}] must be a string, got {type(line).__name__}")
        if line.strip():
            lines.append(line.strip())
    return lines


def _schema_json(schema: SchemaLike) -> str:
    if schema is None:
        return ""
    if isinstance(schema, str | os.PathLike):
        path = Path(schema)
        if not path.is_file():
            raise InvalidArgument(f"input_schema file {str(path)!r} does not exist")
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"input_schema file {str(path)!r} is not JSON: {exc}") from None
    else:
        loaded = dict(schema)
    if not isinstance(loaded, dict):
        raise InvalidArgument(
            f"input_schema must be a JSON object (a JSON Schema), got {type(loaded).__name__}"
        )
    return json.dumps(loaded, sort_keys=True, separators=(",", ":"))


def upload_request(
    path: PathLike,
    *,
    name: str | None,
    entry_point: str,
    requirements: RequirementsLike,
    input_schema: SchemaLike,
    description: str,
) -> programs_pb2.UploadProgramRequest:
    """Check and pack a program directory (blocking file I/O: run it off the loop)."""
    root = Path(path)
    if not root.is_dir():
        what = "a file" if root.exists() else "missing"
        raise InvalidArgument(f"program path {str(root)!r} must be a directory ({what})")
    program_name = (name if name is not None else root.resolve().name).strip()
    if not program_name:
        raise InvalidArgument("program name must not be empty")
    _check_entry_point(root, entry_point)
    return programs_pb2.UploadProgramRequest(
        name=program_name,
        archive=pack_program(root),
        entry_point=entry_point,
        requirements=_requirement_lines(requirements),
        input_schema_json=_schema_json(input_schema),
        description=description,
    )


__all__ = ["Program", "RequirementsLike", "SchemaLike", "program_ref", "upload_request"]
