"""The runtime every RAGFleet service shares: config, telemetry, errors, server bootstrap, client channels, stubs."""
