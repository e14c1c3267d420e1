"""The `demix` command: start the service (`up`, `api`, `worker`, `grpc`) and manage it. The top layer: may import every sub-package; none imports it."""
