"""The `demix` command: start the service (`up`, `api`, `worker`) and manage it."""
