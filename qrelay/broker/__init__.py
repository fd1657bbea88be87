"""The broker: durable job store, scheduler, leases and the gRPC services.

Start one in-process with `running_broker(BrokerSettings(...))`; `qrelay
broker serve` runs the same until SIGINT/SIGTERM.
"""

from qrelay.broker.server import Broker, running_broker
from qrelay.broker.settings import BrokerSettings

__all__ = ["Broker", "BrokerSettings", "running_broker"]
