"""`QRelayBackend`: what a broker knows about one backend, shaped like Runtime's.

A snapshot of `BackendService.Get`; `status()` refreshes it. `target` is a
Qiskit `Target` built from the announced basis gates and coupling map, so a
user can transpile locally (`generate_preset_pass_manager(backend=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

from qrelay._proto.v1 import backends_pb2

if TYPE_CHECKING:
    from qrelay.client.service import QRelayService


@dataclass(frozen=True)
class BackendStatus:
    """Availability of a backend (Qiskit 1.x's BackendStatus fields that still mean something)."""

    backend_name: str
    operational: bool
    pending_jobs: int
    online_executors: int
    status_msg: str
    last_seen: datetime | None


class QRelayBackend:
    """A backend served by qrelay executors, e.g. `aer` or `fake_manila`."""

    def __init__(self, proto: backends_pb2.Backend, service: QRelayService | None = None) -> None:
        self._proto = proto
        self._service = service

    def __repr__(self) -> str:
        state = "online" if self.online else "offline"
        return f"<QRelayBackend {self.name!r} {self.num_qubits} qubits, {state}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QRelayBackend) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    @property
    def service(self) -> QRelayService | None:
        """The sync service this backend came from (None when from AsyncQRelayService)."""
        return self._service

    @property
    def name(self) -> str:
        return self._proto.info.name

    @property
    def num_qubits(self) -> int:
        return self._proto.info.num_qubits

    @property
    def basis_gates(self) -> list[str]:
        return list(self._proto.info.basis_gates)

    @property
    def coupling_map(self) -> list[list[int]] | None:
        """Directed edges as [control, target]; None for all-to-all connectivity."""
        edges = [[e.control, e.target] for e in self._proto.info.coupling_map]
        return edges or None

    @property
    def simulator(self) -> bool:
        return self._proto.info.simulator

    @property
    def description(self) -> str:
        return self._proto.info.description

    @property
    def online(self) -> bool:
        return self._proto.online

    @property
    def queue_length(self) -> int:
        """Jobs you would wait for here: your own queued jobs, scaled by the
        active tenants' fair shares (other tenants' queues are not shown)."""
        return self._proto.queue_length

    @property
    def proto(self) -> backends_pb2.Backend:
        return self._proto

    def status(self) -> BackendStatus:
        """Current availability (asks the broker when this backend came from a sync service)."""
        if self._service is not None:
            self._proto = self._service._backend_proto(self.name)
        p = self._proto
        return BackendStatus(
            backend_name=p.info.name,
            operational=p.online,
            pending_jobs=p.queue_length,
            online_executors=p.online_executors,
            status_msg="active" if p.online else "no executor online; jobs wait in the queue",
            last_seen=p.last_seen.ToDatetime() if p.HasField("last_seen") else None,
        )

    @cached_property
    def target(self) -> Any:
        """A qiskit `Target` with the announced gates and connectivity (no calibrations).

        Simulator-only instructions (Aer's `save_*`, `kraus`, ...) have no
        standard gate class and are left out; they are not transpiler targets.
        """
        from qiskit.circuit import (
            ForLoopOp,
            IfElseOp,
            SwitchCaseOp,
            WhileLoopOp,
        )
        from qiskit.circuit.library import get_standard_gate_name_mapping
        from qiskit.transpiler import CouplingMap, Target

        custom: dict[str, Any] = {
            "if_else": IfElseOp,
            "for_loop": ForLoopOp,
            "while_loop": WhileLoopOp,
            "switch_case": SwitchCaseOp,
        }
        known = set(get_standard_gate_name_mapping()) | set(custom)
        gates = [g for g in self.basis_gates if g in known]
        edges = self.coupling_map
        return Target.from_configuration(
            basis_gates=gates,
            num_qubits=self.num_qubits,
            coupling_map=CouplingMap(edges) if edges else None,
            custom_name_mapping=custom,
        )
