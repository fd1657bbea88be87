"""What every `qrelay` command group shares: consoles, options, help that reads like a
tool's, error reporting, running a coroutine, serving until a signal, and how
states, ids and times print."""

from __future__ import annotations

import gc
import importlib
import signal
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, NoReturn, TypeVar

import anyio
import structlog
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand, TyperGroup, TyperOption

from qrelay._proto.v1 import types_pb2
from qrelay.errors import QRelayError, exception_leaves

if TYPE_CHECKING:
    from typer.models import CommandFunctionType

    from qrelay.cli._broker import Broker
    from qrelay.client import AsyncQRelayService

log = structlog.get_logger(__name__)
console = Console()
err_console = Console(stderr=True)
T = TypeVar("T")


class _ToolHelp:
    """`--help` as a tool prints it: a flag shows no value placeholder (typer would print
    `<bool>`), and a repeatable option names its value once (`STATE`, not `<list[str]>`)."""

    def get_params(self, ctx: Any) -> list[Any]:
        params: list[Any] = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if isinstance(param, TyperOption) and param.metavar is None:
                if param.is_flag:
                    param.metavar = ""
                elif param.multiple:
                    param.metavar = (param.name or "value").upper()
        return params


class Command(_ToolHelp, TyperCommand):
    """A `qrelay` command (see `_ToolHelp`)."""


class Group(_ToolHelp, TyperGroup):
    """A `qrelay` command group (see `_ToolHelp`)."""


class SettingsCommand(Command):
    """A server command whose flags set fields of a pydantic settings class: `--help`
    shows each flag's default and environment variable, read from the class itself.

    `settings` names the class ("module:Class"; imported only to print help, and a
    server imports it anyway); a flag sets the field of its own name unless
    `renamed` says otherwise. A flag whose help already names its default or its
    environment variable keeps what it says.
    """

    settings: ClassVar[str]
    renamed: ClassVar[dict[str, str]] = {}

    def format_help(self, ctx: Any, formatter: Any) -> None:
        # typer builds the click command anew for every run, so what is set here only
        # ever shows in this help: the settings class still reads the environment
        # itself (typer would, say, split a JSON list variable on spaces).
        module, _, name = self.settings.partition(":")
        model = getattr(importlib.import_module(module), name)
        prefix = model.model_config.get("env_prefix", "")
        for param in self.params:
            if not isinstance(param, TyperOption) or param.hidden or not param.name:
                continue
            field_name = self.renamed.get(param.name, param.name)
            field = model.model_fields.get(field_name)
            if field is None:
                continue
            text = param.help or ""
            if "QRELAY_" not in text and param.envvar is None:
                param.envvar = prefix + field_name.upper()
                param.show_envvar = True
            default = field.get_default(call_default_factory=True)
            if "default" not in text and default not in (None, "", [], {}):
                param.show_default = _shown(default)
        super().format_help(ctx, formatter)


def _shown(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


class Typer(typer.Typer):
    """`typer.Typer` whose groups and commands print help as `_ToolHelp` says."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("cls", Group)
        super().__init__(**kwargs)

    def command(  # type: ignore[override]
        self, name: str | None = None, **kwargs: Any
    ) -> Callable[[CommandFunctionType], CommandFunctionType]:
        kwargs.setdefault("cls", Command)
        return super().command(name, **kwargs)


BrokerAddr = Annotated[
    str,
    typer.Option(
        "--broker",
        envvar="QRELAY_BROKER",
        metavar="HOST:PORT",
        help="Broker address (`qrelay dev` listens on 127.0.0.1:50051).",
    ),
]
Token = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        envvar="QRELAY_TOKEN_FILE",
        metavar="FILE",
        help=(
            "File holding the bearer token that names your tenant (or set QRELAY_TOKEN). "
            "Tokens are never taken as flags: any user of this host can read a "
            "command line in /proc."
        ),
    ),
]

#: Why a secret is refused as a flag, for the commands that once took one.
SECRET_FLAG = (
    "secrets are not accepted as flags: any user of this host can read a process's "
    "command line (/proc/PID/cmdline)"
)


def refuse_secret_flag(flag: str, instead: str) -> NoReturn:
    """Exit 2: `flag` would put a secret in argv; say what to use instead."""
    err_console.print(f"[red]{flag}: {SECRET_FLAG}; use {instead}[/]", highlight=False)
    raise typer.Exit(2)


def _enum_names(enum: Any, prefix: str) -> dict[int, str]:
    """Number -> name of a proto enum's values, without its prefix (UNSPECIFIED left out)."""
    return {v.number: v.name.removeprefix(prefix) for v in enum.DESCRIPTOR.values if v.number}


_STATE_NAMES = _enum_names(types_pb2.JobState, "JOB_STATE_")
_STATE_STYLE = {
    "QUEUED": "yellow",
    "RUNNING": "cyan",
    "DONE": "green",
    "FAILED": "red",
    "CANCELLED": "magenta",
}
_KIND_NAMES = {n: name.lower() for n, name in _enum_names(types_pb2.JobKind, "JOB_KIND_").items()}
DONE = types_pb2.JOB_STATE_DONE


def _fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


@contextmanager
def _reported_errors() -> Iterator[None]:
    """Turn qrelay errors and bad settings into one line and an exit code."""
    from qrelay.cli._broker import Unreachable

    try:
        yield
    except (QRelayError, ValidationError, BaseExceptionGroup) as exc:
        for leaf in exception_leaves(exc):
            if isinstance(leaf, Unreachable):
                _fail(leaf.message)  # already says where and what to do
            if isinstance(leaf, QRelayError):
                _fail(f"{leaf.code_name}: {leaf.message}")
            if isinstance(leaf, ValidationError):
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}"
                    for e in leaf.errors()
                )
                _fail(f"invalid settings: {problems}", 2)
        raise


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    with _reported_errors():
        return anyio.run(fn, backend="asyncio")


def _freeze_startup_heap() -> None:
    """Move everything alive after start-up out of the garbage collector's view.

    An executor holds Qiskit, Aer and its backends: ~180k long-lived objects
    that every full collection walks (~80 ms here, with the GIL held, so a job
    or a heartbeat waits). Frozen, a full collection only sees what jobs made.
    """
    gc.collect()
    gc.freeze()


async def _until_signal(serve: Callable[[], Awaitable[None]]) -> None:
    """Run `serve` until it returns or SIGINT/SIGTERM arrives, then cancel it cleanly."""
    # A serving process configures logging once: each logger may keep its bound
    # form instead of rebuilding it on every call (the job path logs several times).
    structlog.configure(cache_logger_on_first_use=True)
    async with anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("shutdown.requested", signal=signal.Signals(signum).name)
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch_signals)
        await serve()
        tg.cancel_scope.cancel()


def _given(**values: Any) -> dict[str, Any]:
    """Only the flags the user gave, so environment variables and defaults still apply."""
    return {k: v for k, v in values.items() if v is not None}


def _token(token_file: Path | None) -> str | None:
    if token_file is None:
        return None
    try:
        return token_file.read_text(encoding="utf-8").strip() or None
    except OSError as exc:
        _fail(f"cannot read --token-file {token_file}: {exc.strerror or exc}", 2)


def _service(broker: str, token_file: Path | None) -> AsyncQRelayService:
    """The SDK's service for `broker` (imports Qiskit: for commands that submit work); the
    token from `token_file`, else QRELAY_TOKEN(_FILE)."""
    from qrelay.client.service import AsyncQRelayService

    return AsyncQRelayService(broker, _token(token_file), timeout=15.0)


def _broker(broker: str, token_file: Path | None) -> Broker:
    """A qiskit-free connection to `broker` for the commands that only read and manage
    (see `qrelay.cli._broker`); the token as `_service` finds it."""
    from qrelay.cli._broker import Broker

    return Broker(broker, _token(token_file))


def _state(state: int) -> str:
    return _STATE_NAMES.get(state, "UNSPECIFIED")


def _styled_state(state: int) -> str:
    name = _state(state)
    return f"[{_STATE_STYLE.get(name, 'white')}]{name}[/]"


def _ts(value: Any) -> str:
    """A protobuf Timestamp as local 'YYYY-MM-DD HH:MM:SS', '' when unset."""
    if value is None or (value.seconds == 0 and value.nanos == 0):
        return ""
    return datetime.fromtimestamp(value.seconds + value.nanos / 1e9).strftime("%Y-%m-%d %H:%M:%S")


def _ts_short(value: Any) -> str:
    """A protobuf Timestamp as local 'MM-DD HH:MM' for tables, '' when unset."""
    return _ts(value)[5:16]


def _code_name(code: int) -> str:
    from qrelay.errors import error_for_code

    cls = type(error_for_code(code, ""))
    return cls.code_name if cls is not QRelayError else f"code {code}"


def _print_rows(rows: list[tuple[str, str]]) -> None:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")  # ids stay whole, if on two lines
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
