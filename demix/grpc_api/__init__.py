"""The original service's gRPC interface (`demixing.proto`), served by `demix grpc`. Imports no Flask, torch, demix.separation or demix.worker."""
