"""The original service's gRPC interface (`demixing.proto`), served by `demix grpc`."""
