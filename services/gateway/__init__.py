"""The gateway: the public GatewayService (Ask, Ingest, DeleteDocuments) in front of embedding, retrieval and
generation."""
