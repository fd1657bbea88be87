"""The quantum backends an executor can serve, by name.

`aer` is the ideal Aer simulator; every qiskit-ibm-runtime fake device is
served as Aer with that device's target (basis gates, coupling map) and the
very noise model the fake device's own `run` (Runtime's local mode) uses:
built from its BackendProperties, with each qubit's asymmetric readout error
P(0|1) != P(1|0). `AerSimulator.from_backend`'s default model is built from
the Target instead and symmetrizes readout (measured on fake_manila: level-0
|error| of a TFIM <Z> 0.072 vs 0.044 through Runtime), so it is not used.

Every backend is found by name through one registry of `BackendProvider`s:
the built-in ones above, those an installed package announces under the
entry-point group `qrelay.backends`, and those named by the executor's
`backend_providers` setting ("module:attribute"). A provider says whether
its backends simulate on this host (`local`: a job occupies a whole worker
process) or only wait on a remote service (a device: many jobs share one
worker process), so a real device plugs in without touching the control
plane.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import difflib
import functools
import importlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from qiskit.transpiler import Target
from qiskit_aer import AerSimulator
from qiskit_aer.jobs import AerJob

from qrelay._proto.v1 import backends_pb2
from qrelay.errors import NotFound

__all__ = [
    "Backend",
    "BackendProvider",
    "available_backends",
    "load_backend",
    "load_providers",
    "provider_for",
]

IDEAL = "aer"
#: Entry-point group under which installed packages announce BackendProviders.
ENTRY_POINT_GROUP = "qrelay.backends"


@dataclass(frozen=True, eq=False)
class Backend:
    """A named backend: the BackendV2 that runs circuits plus what it announces."""

    name: str
    qiskit: Any  # a qiskit BackendV2 (AerSimulator); qiskit ships no type stubs
    description: str
    simulator: bool = True
    # False for a device whose run only waits on its provider (see BackendProvider).
    local: bool = True
    #: Noiseless: the Estimator gives exact expectation values here (precision 0).
    ideal: bool = False

    @property
    def target(self) -> Target:
        return self.qiskit.target

    @property
    def num_qubits(self) -> int:
        return int(self.qiskit.num_qubits)

    def info(self) -> backends_pb2.BackendInfo:
        """The BackendInfo an executor announces for this backend."""
        target = self.target
        coupling = target.build_coupling_map()
        edges = (
            []
            if coupling is None
            else [backends_pb2.CouplingEdge(control=a, target=b) for a, b in coupling.get_edges()]
        )
        return backends_pb2.BackendInfo(
            name=self.name,
            num_qubits=self.num_qubits,
            basis_gates=sorted(target.operation_names),
            coupling_map=edges,
            simulator=self.simulator,
            description=self.description,
        )


@functools.cache
def _fake_device_classes() -> dict[str, type[Any]]:
    """Fake V2 device classes by backend name, read from class attributes (no JSON loaded)."""
    import qiskit_ibm_runtime.fake_provider as fake_provider
    from qiskit_ibm_runtime.fake_provider.fake_backend import FakeBackendV2

    classes: dict[str, type[Any]] = {}
    for attr in dir(fake_provider):
        cls = getattr(fake_provider, attr)
        if isinstance(cls, type) and issubclass(cls, FakeBackendV2):
            name = getattr(cls, "backend_name", None)
            if isinstance(name, str) and name.startswith("fake_"):
                classes[name] = cls
    return classes


@dataclass(frozen=True)
class BackendProvider:
    """A family of backends, found by name.

    `names()` lists what it offers (for `available_backends` and hints);
    `build(name)` makes one (blocking; called in a worker process). `local`
    is True when a job's run occupies this host's CPU (a simulator: one job
    per worker process) and False when it only waits on a remote service
    (a device: many jobs share one worker process).
    """

    name: str
    names: Callable[[], Sequence[str]]
    build: Callable[[str], Backend]
    local: bool = True


def _build_ideal(name: str) -> Backend:
    return Backend(
        name=IDEAL,
        qiskit=_ExecutorAerSimulator(),
        description="Aer ideal (noiseless) simulator",
        ideal=True,
    )


def _build_fake(name: str) -> Backend:
    cls = _fake_device_classes()[name]
    fake = cls()
    return Backend(
        name=name,
        qiskit=_noisy_simulator(fake),
        description=f"Aer with {cls.__name__}'s noise model and {fake.num_qubits}-qubit target",
    )


BUILT_IN = (
    BackendProvider("aer", lambda: [IDEAL], _build_ideal),
    BackendProvider("fake devices", lambda: sorted(_fake_device_classes()), _build_fake),
)
_extra: list[BackendProvider] = []


def load_providers(references: Sequence[str]) -> None:
    """Add the providers named "module:attribute" (the executor's `backend_providers`)."""
    for reference in references:
        module, _, attribute = reference.partition(":")
        provider = getattr(importlib.import_module(module), attribute)
        if not isinstance(provider, BackendProvider):
            raise TypeError(f"{reference} is not a qrelay BackendProvider")
        if provider not in _extra:
            _extra.append(provider)


@functools.cache
def _installed() -> tuple[BackendProvider, ...]:
    found = []
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        provider = entry.load()
        if isinstance(provider, BackendProvider):
            found.append(provider)
    return tuple(found)


def providers() -> list[BackendProvider]:
    """Every provider, in the order names are looked up (built-in ones first)."""
    return [*BUILT_IN, *_installed(), *_extra]


def provider_for(name: str) -> BackendProvider:
    """The provider that offers `name`; NotFound with the nearest names otherwise."""
    for provider in providers():
        if name in provider.names():
            return provider
    names = available_backends()
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"did you mean {' or '.join(close)}?" if close else f"e.g. {', '.join(names[:6])}"
    raise NotFound(f"unknown backend {name!r} ({len(names)} are available); {hint}")


def available_backends() -> list[str]:
    """Every name `load_backend` accepts: "aer", the fake devices, then plug-ins'."""
    return [name for provider in providers() for name in provider.names()]


def load_backend(name: str) -> Backend:
    """Build the backend called `name`; blocking (up to ~1 s), so call it off the event loop.

    Its pass manager is built on first use (`transpile.pass_manager`); a
    worker warms it at start so the first job does not pay for it.
    """
    provider = provider_for(name)
    backend = provider.build(name)
    if backend.local != provider.local:
        backend = dataclasses.replace(backend, local=provider.local)
    return backend


class _InlineExecutor(concurrent.futures.Executor):
    """Runs what is submitted at once, in the caller's thread; returns a finished Future."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller via the Future
            future.set_exception(exc)
        return future


_INLINE = _InlineExecutor()


class _ExecutorAerSimulator(AerSimulator):  # type: ignore[misc]
    """AerSimulator as the executor uses it: Target built once, runs in the caller's thread.

    The ideal AerSimulator rebuilds its Target (~1 ms of CPU, measured) each
    time it is read, and a reference primitive reads it several times per
    job: that was a third of the executor's CPU for a tiny Sampler job. The
    cache is dropped whenever options or the configuration change.

    Aer hands every run to one process-wide worker thread and the caller
    blocks on it: a thread hop per job and, worse, jobs of different slots
    (and backends) simulated one at a time. The executor already calls
    backends from its own worker threads, so `run` executes there: the
    returned job is finished. Aer releases the GIL while simulating, so
    slots now simulate in parallel.
    """

    _cached_target: Target | None = None

    @property
    def target(self) -> Target:
        cached = self._cached_target
        if cached is None:
            cached = self._cached_target = super().target
        return cached

    def set_options(self, **fields: Any) -> None:
        self._cached_target = None
        super().set_options(**fields)

    def clear_options(self) -> None:
        self._cached_target = None
        super().clear_options()

    def set_max_qubits(self, max_qubits: int) -> None:
        self._cached_target = None
        super().set_max_qubits(max_qubits)

    def _run_circuits(self, circuits: Any, parameter_binds: Any, **run_options: Any) -> AerJob:
        """Aer's own `_run_circuits`, with the job executed inline (see the class docstring)."""
        job = AerJob(
            self,
            str(uuid.uuid4()),
            self._execute_circuits_job,
            parameter_binds=parameter_binds,
            circuits=circuits,
            run_options=run_options,
            executor=_INLINE,
        )
        job.submit()
        return job


def _noisy_simulator(fake: Any) -> AerSimulator:
    """Aer for `fake` with the noise model its own `run` uses (bit-identical counts at
    equal seeds, tested), or Aer's Target-derived model when it has no properties."""
    properties = fake.properties()
    if properties is None:
        return _ExecutorAerSimulator.from_backend(fake)
    from qiskit_aer.noise import NoiseModel

    noise = NoiseModel.from_backend_properties(properties, dt=fake.dt)
    return _ExecutorAerSimulator.from_backend(fake, noise_model=noise)
