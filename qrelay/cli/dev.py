"""`qrelay dev`: a broker and an executor in one process.

Plaintext on loopback by default. Any other listen address needs TLS
(`--tls-cert/--tls-key`) and tokens (`--tokens-file`), or `--insecure-public`
to accept the risk with a loud warning: dev runs uploaded programs, so a
public plaintext dev stack lets anyone on the network run code here.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Annotated, Any

import anyio
import structlog
import typer

from qrelay.cli._shared import (
    _fail,
    _freeze_startup_heap,
    _reported_errors,
    _run,
    _until_signal,
    console,
    warn_loudly,
)
from qrelay.tls import exposure, is_loopback

log = structlog.get_logger(__name__)

DEFAULT_PORT = 50051


def dev(
    port: Annotated[
        int | None,
        typer.Option(help="Broker port on 127.0.0.1; 0 picks a free one (default 50051)."),
    ] = None,
    listen: Annotated[
        str | None,
        typer.Option(
            help="Address HOST:PORT instead of 127.0.0.1:--port. Anything but loopback needs "
            "--tls-cert/--tls-key and --tokens-file, or --insecure-public."
        ),
    ] = None,
    directory: Annotated[
        Path, typer.Option("--dir", help="Where the SQLite database lives.")
    ] = Path(".qrelay"),
    backend: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME", help="Backends of the executor (default: aer, fake_manila)."),
    ] = None,
    slots: Annotated[int, typer.Option(help="Executor slots.")] = 2,
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate to serve with.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The private key of --tls-cert.")] = None,
    tls_ca: Annotated[
        Path | None,
        typer.Option(
            help="CA the in-process executor checks the certificate against "
            "(default: --tls-cert itself, for a self-signed certificate)."
        ),
    ] = None,
    tokens_file: Annotated[
        Path | None,
        typer.Option(help="File of client tokens, one 'token=tenant' per line."),
    ] = None,
    insecure_public: Annotated[
        bool,
        typer.Option(
            "--insecure-public",
            help="Listen on a non-loopback address without TLS or tokens anyway (dangerous).",
        ),
    ] = False,
) -> None:
    """A broker and one executor in this process, until Ctrl-C."""
    from qrelay.broker.server import running_broker
    from qrelay.broker.settings import BrokerSettings
    from qrelay.executor.agent import running_executor
    from qrelay.executor.settings import ExecutorSettings

    if port is not None and listen is not None:
        _fail("give --port or --listen, not both", 2)
    address = listen or f"127.0.0.1:{DEFAULT_PORT if port is None else port}"
    backends = backend or ["aer", "fake_manila"]
    tls: dict[str, Any] = {}
    if tls_cert is not None or tls_key is not None:
        tls = {"tls_cert": tls_cert, "tls_key": tls_key}
    danger = exposure(address, tls=bool(tls), tokens=tokens_file is not None)
    if danger is not None:
        if not insecure_public:
            _fail(
                f"qrelay dev refuses to listen on {address} without TLS and tokens: it runs "
                "uploaded programs, so anyone who reaches the port could run code on this "
                "machine. Listen on 127.0.0.1, or give --tls-cert/--tls-key and --tokens-file, "
                "or pass --insecure-public to accept the risk.",
                2,
            )
        warn_loudly(f"qrelay dev is {danger}; anyone who reaches it can run code here.")
        log.warning("dev.insecure_public", listen=address, reason=danger)
    # Off loopback, executors must prove themselves too: the in-process one
    # gets a secret that never leaves this process.
    executor_token = None if is_loopback(address) else secrets.token_urlsafe(32)
    with _reported_errors():
        broker_settings = BrokerSettings(
            listen=address,
            db_path=directory / "broker.db",
            tokens_file=tokens_file,
            executor_token=executor_token,
            **tls,
        )

    async def serve() -> None:
        directory.mkdir(parents=True, exist_ok=True)
        async with running_broker(broker_settings) as broker:
            # One developer on loopback: programs run even where the host cannot
            # isolate them (not root, no namespaces); the executor logs what is
            # missing. QRELAY_SANDBOX_ALLOW_WEAK_SANDBOX=false keeps the refusal.
            sandbox = (
                {}
                if "QRELAY_SANDBOX_ALLOW_WEAK_SANDBOX" in os.environ
                else {"allow_weak_sandbox": True}
            )
            link: dict[str, Any] = {}
            if broker_settings.tls:
                link = {"tls": True, "tls_ca": tls_ca or tls_cert}
            executor_settings = ExecutorSettings(
                broker=broker.executor_address,
                backends=backends,
                slots=slots,
                sandbox=sandbox,
                token=executor_token,
                **link,
            )
            async with running_executor(executor_settings):
                _freeze_startup_heap()
                scheme = "grpcs://" if broker_settings.tls else ""
                console.print(
                    f"qrelay dev: broker on [bold cyan]{scheme}{broker.address}[/] "
                    f"(executor {executor_settings.executor_id}: {', '.join(backends)}; "
                    f"db {broker_settings.db_path}); Ctrl-C to stop",
                    highlight=False,
                    soft_wrap=True,
                )
                await anyio.sleep_forever()

    _run(lambda: _until_signal(serve))
    console.print("qrelay dev: stopped")
