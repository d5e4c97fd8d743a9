"""The embedding service: texts -> vectors, micro-batched, cached in two levels, on a local or remote model."""
