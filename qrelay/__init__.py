"""qrelay: a durable gRPC job broker that runs Qiskit work beside the backend."""

__version__ = "0.1.0"
