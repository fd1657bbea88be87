"""The broker: durable job store, scheduler, leases and the gRPC services."""
