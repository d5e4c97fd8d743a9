"""RAGFleet: a retrieval-augmented generation mesh of four gRPC services and their shared runtime."""
