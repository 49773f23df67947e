"""Generated gRPC/protobuf code for lastguard's contracts; regenerate with `make proto`."""
