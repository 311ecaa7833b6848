"""The expertmesh.v1 gRPC API. `inspection_pb2*` here are generated from proto/expertmesh/v1/inspection.proto
by `make proto` (run by `make setup`); they are build outputs, never edited or committed."""
