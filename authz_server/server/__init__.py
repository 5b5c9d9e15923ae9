"""gRPC transport: thin handlers that validate, call a service and convert the answer."""
