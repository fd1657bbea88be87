"""ProgramService on the broker: upload, look up, list and delete programs.

A program version is stored per tenant by content hash ("p-" + sha256 of
name, archive, entry point, requirements and schema), so the same upload
twice is one version and a changed one is the next version of its name.
The broker checks what it can without running anything: size, the archive's
structure (a gzip tar whose members stay inside the program directory and
that contains the entry module), the entry point's syntax and the input
schema (jsonschema). It never imports qiskit; the executor runs the code.

Program jobs are resolved at submit (`check_job`): a name becomes the id of
its newest version, written into the stored spec, and the inputs are checked
against the program's schema. At assignment the scheduler's resolver
(`bundle`) attaches the archive. Deleting a version that queued or running
jobs still need hides it at once but keeps its archive until they finish,
so those jobs run what they were submitted with.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import tarfile
import zlib
from collections import OrderedDict
from typing import Any

import anyio.to_thread
import jsonschema
import structlog

from qrelay._proto.v1 import executor_pb2, types_pb2
from qrelay.broker.quotas import QuotaSource, SettingsQuotas, audited
from qrelay.broker.settings import MIB, BrokerSettings
from qrelay.broker.store import JobStore
from qrelay.broker.store.base import NewProgram, ProgramRecord
from qrelay.errors import InvalidArgument, NotFound, ResourceExhausted

log = structlog.get_logger(__name__)

MAX_NAME = 128
MAX_REQUIREMENTS = 200
MAX_REQUIREMENT_CHARS = 500
MAX_DESCRIPTION = 4096
# An archive may unpack to at most this many times max_program_bytes (zip bombs).
MAX_UNPACK_FACTOR = 16
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_ID = re.compile(r"p-[0-9a-f]{64}")
# Bundles are immutable per (tenant, id): cache recent ones for assignment.
BUNDLE_CACHE_BYTES = 64 * MIB
VALIDATOR_CACHE = 1024


def _size(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if n >= MIB // 10 else f"{n} bytes"


def program_id(
    name: str, archive: bytes, entry_point: str, requirements: tuple[str, ...], schema: str
) -> str:
    """Content hash over length-prefixed fields, so no two field splits collide."""
    digest = hashlib.sha256()
    for part in (name.encode(), archive, entry_point.encode(), *(r.encode() for r in requirements)):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    digest.update(b"\x00schema")
    digest.update(schema.encode())
    return "p-" + digest.hexdigest()


def check_name(name: str) -> None:
    if not name:
        raise InvalidArgument("name is required (e.g. 'vqe')")
    if len(name) > MAX_NAME or not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"name {name!r} must be 1-{MAX_NAME} letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if _ID.fullmatch(name):
        raise InvalidArgument(f"name {name!r} looks like a program id; choose another name")


def check_entry_point(entry_point: str) -> None:
    """`module:function`, the module possibly dotted, every part an identifier."""
    module, sep, function = entry_point.partition(":")
    parts = module.split(".")
    if not sep or not function.isidentifier() or not all(p.isidentifier() for p in parts):
        raise InvalidArgument(
            f"entry_point {entry_point!r} must look like 'module:function' "
            "(Python identifiers, e.g. 'main:main')"
        )


def check_requirements(requirements: list[str]) -> tuple[str, ...]:
    if len(requirements) > MAX_REQUIREMENTS:
        raise InvalidArgument(
            f"{len(requirements)} requirements; at most {MAX_REQUIREMENTS} are allowed"
        )
    for i, line in enumerate(requirements):
        if not line.strip() or "\n" in line or "\r" in line:
            raise InvalidArgument(
                f"requirements[{i}] {line!r} must be one non-empty requirement line"
            )
        if len(line) > MAX_REQUIREMENT_CHARS:
            raise InvalidArgument(
                f"requirements[{i}] is {len(line)} characters; at most {MAX_REQUIREMENT_CHARS}"
            )
        if line.lstrip().startswith("-"):
            raise InvalidArgument(
                f"requirements[{i}] {line!r}: pip options are not allowed, only requirement "
                "specifiers such as 'six>=1.16'"
            )
    return tuple(line.strip() for line in requirements)


def check_schema(schema_json: str) -> type[Any] | None:
    """Parse and check a JSON Schema; returns its validator class (None: no schema)."""
    if not schema_json.strip():
        return None
    try:
        schema = json.loads(schema_json)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"input_schema_json is not valid JSON: {exc}") from None
    if not isinstance(schema, dict | bool):
        raise InvalidArgument(
            f"input_schema_json must be a JSON Schema object, got {type(schema).__name__}"
        )
    validator_cls: type[Any] = jsonschema.validators.validator_for(schema)
    try:
        validator_cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "".join(f"[{p!r}]" for p in exc.absolute_path) or "(top level)"
        raise InvalidArgument(
            f"input_schema_json is not a valid JSON Schema at {where}: {exc.message}"
        ) from None
    return validator_cls


def check_archive(archive: bytes, entry_point: str, max_unpacked: int) -> None:
    """A gzip tar of regular files and directories inside the program directory,
    containing the entry module. Blocking (decompresses): run it in a thread."""
    if not archive:
        raise InvalidArgument(
            "archive is empty (pack the program with qrelay.program.pack_program)"
        )
    if archive[:2] != b"\x1f\x8b":
        raise InvalidArgument(
            "archive is not gzip-compressed; expected a tar.gz (qrelay.program.pack_program)"
        )
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise InvalidArgument(f"archive is not a valid tar.gz: {exc}") from None
    names: set[str] = set()
    unpacked = 0
    for member in members:
        name = member.name
        if name.startswith("/") or re.match(r"[A-Za-z]:[\\/]", name):
            raise InvalidArgument(f"archive member {name!r} has an absolute path")
        if ".." in name.replace("\\", "/").split("/"):
            raise InvalidArgument(f"archive member {name!r} leaves the program directory (..)")
        if member.issym() or member.islnk():
            target = member.linkname
            base = posixpath.dirname(name) if member.issym() else ""
            resolved = posixpath.normpath(posixpath.join(base, target))
            if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
                raise InvalidArgument(
                    f"archive member {name!r} links to {target!r}, outside the program directory"
                )
        elif not (member.isfile() or member.isdir()):
            raise InvalidArgument(
                f"archive member {name!r} is a device, FIFO or other special file; only files, "
                "directories and links inside the program are allowed"
            )
        unpacked += max(member.size, 0)
        names.add(posixpath.normpath(name))
    if unpacked > max_unpacked:
        raise ResourceExhausted(
            f"archive unpacks to {_size(unpacked)}; at most {_size(max_unpacked)} "
            f"({MAX_UNPACK_FACTOR} x QRELAY_MAX_PROGRAM_BYTES)"
        )
    module = entry_point.partition(":")[0].replace(".", "/")
    if f"{module}.py" not in names and f"{module}/__init__.py" not in names:
        raise InvalidArgument(
            f"entry point module {module.replace('/', '.')!r} not found in the archive "
            f"(no {module}.py or {module}/__init__.py)"
        )


def check_inputs(inputs_json: str, validator: Any | None) -> None:
    """Inputs must be a JSON object of keyword arguments satisfying the schema.

    Same rules and wording as the executor's own check, so the answer does
    not depend on where the mistake is caught."""
    try:
        raw = json.loads(inputs_json) if inputs_json.strip() else {}
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"program.inputs_json is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidArgument(
            "program.inputs_json must be a JSON object of keyword arguments, got "
            f"{type(raw).__name__}"
        )
    if validator is None:
        return
    error = jsonschema.exceptions.best_match(validator.iter_errors(raw))
    if error is not None:
        where = "".join(f"[{p!r}]" for p in error.absolute_path) or "(top level)"
        raise InvalidArgument(
            f"inputs do not match the program's input schema at {where}: {error.message}"
        )


class Programs:
    """Program storage and program-job resolution for one broker."""

    def __init__(
        self, store: JobStore, settings: BrokerSettings, quotas: QuotaSource | None = None
    ) -> None:
        self.store = store
        self.settings = settings
        self.quotas = quotas or SettingsQuotas(settings)
        # program id -> its jsonschema validator (None: no schema); ids are immutable.
        self._validators: OrderedDict[str, Any | None] = OrderedDict()
        self._bundles: OrderedDict[tuple[str, str], executor_pb2.ProgramBundle] = OrderedDict()
        self._bundle_bytes = 0

    async def upload(
        self,
        tenant: str,
        *,
        name: str,
        archive: bytes,
        entry_point: str,
        requirements: list[str] | tuple[str, ...] = (),
        input_schema_json: str = "",
        description: str = "",
    ) -> tuple[ProgramRecord, bool]:
        """Validate and store; returns (version, created)."""
        check_name(name)
        limit = self.settings.max_program_bytes
        if len(archive) > limit:
            raise ResourceExhausted(
                f"program archive is {_size(len(archive))}; this broker accepts at most "
                f"{_size(limit)} per program (QRELAY_MAX_PROGRAM_BYTES)"
            )
        if not entry_point:
            raise InvalidArgument("entry_point is required (e.g. 'main:main')")
        check_entry_point(entry_point)
        reqs = check_requirements(list(requirements))
        check_schema(input_schema_json)
        if len(description) > MAX_DESCRIPTION:
            raise InvalidArgument(
                f"description is {len(description)} characters; at most {MAX_DESCRIPTION}"
            )
        await anyio.to_thread.run_sync(
            check_archive, archive, entry_point, MAX_UNPACK_FACTOR * limit
        )
        pid = program_id(name, archive, entry_point, reqs, input_schema_json)
        new = NewProgram(
            id=pid,
            tenant=tenant,
            name=name,
            archive=archive,
            entry_point=entry_point,
            requirements=reqs,
            input_schema_json=input_schema_json,
            description=description,
        )
        quota = await self.quotas.quota(tenant)
        with audited("upload_program"):
            record, created = await self.store.put_program(new, quota)
        log.info(
            "program.uploaded" if created else "program.reuploaded",
            tenant=tenant,
            program_id=record.id,
            name=name,
            version=record.version,
            size_bytes=record.size_bytes,
        )
        return record, created

    async def get(self, tenant: str, program: str) -> ProgramRecord:
        if not program:
            raise InvalidArgument("program is required (an id or a name)")
        return await self.store.get_program(tenant, program)

    async def list(self, tenant: str, name: str = "") -> list[ProgramRecord]:
        return await self.store.list_programs(tenant, name)

    async def delete(self, tenant: str, program: str) -> int:
        if not program:
            raise InvalidArgument("program is required (an id or a name)")
        deleted = await self.store.delete_programs(tenant, program)
        log.info("program.deleted", tenant=tenant, program=program, versions=deleted)
        return deleted

    # --- program jobs -------------------------------------------------------
    async def check_job(self, tenant: str, spec: types_pb2.JobSpec) -> str:
        """Submit hook: resolve the program to an id (written into `spec`) and
        check the inputs against its schema; returns the id."""
        ref = spec.program.program
        try:
            record = await self.store.get_program(tenant, ref)
        except NotFound:
            raise NotFound(
                f"program {ref!r} not found: upload it first (ProgramService.Upload)"
            ) from None
        if record.id in self._validators:
            self._validators.move_to_end(record.id)
        else:
            cls = check_schema(record.input_schema_json)
            self._validators[record.id] = (
                None if cls is None else cls(json.loads(record.input_schema_json))
            )
            if len(self._validators) > VALIDATOR_CACHE:
                self._validators.popitem(last=False)
        check_inputs(spec.program.inputs_json, self._validators[record.id])
        spec.program.program = record.id
        return record.id

    async def bundle(
        self, spec: types_pb2.JobSpec, tenant: str
    ) -> executor_pb2.ProgramBundle | None:
        """Scheduler hook: the program an assigned job runs (its id was fixed at submit)."""
        key = (tenant, spec.program.program)
        cached = self._bundles.get(key)
        if cached is not None:
            self._bundles.move_to_end(key)
            return cached
        try:
            record = await self.store.get_program(tenant, key[1], include_deleted=True)
            archive = await self.store.get_program_archive(tenant, record.id)
        except NotFound:
            log.error("program.missing", tenant=tenant, program=key[1])
            return None
        bundle = executor_pb2.ProgramBundle(
            id=record.id,
            name=record.name,
            archive=archive,
            entry_point=record.entry_point,
            requirements=list(record.requirements),
            input_schema_json=record.input_schema_json,
        )
        if record.id == key[1]:  # only ids are immutable
            self._bundles[key] = bundle
            self._bundle_bytes += len(archive)
            while self._bundle_bytes > BUNDLE_CACHE_BYTES and len(self._bundles) > 1:
                _, old = self._bundles.popitem(last=False)
                self._bundle_bytes -= len(old.archive)
        return bundle
