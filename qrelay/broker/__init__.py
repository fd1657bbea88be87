"""The broker: durable job store, scheduler, leases and the gRPC services.

Start one in-process with `running_broker(BrokerSettings(...))`, or run
`serve_forever(settings)` until SIGINT/SIGTERM (what `qrelay broker serve` does).
"""

from qrelay.broker.server import Broker, running_broker, serve_forever
from qrelay.broker.settings import BrokerSettings

__all__ = ["Broker", "BrokerSettings", "running_broker", "serve_forever"]
