"""Discovery: frame embeddings, the vector index, search, and hard-example mining."""
