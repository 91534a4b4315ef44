"""Several hotmodel nodes, one service: the shared PostgreSQL, the node registry, placement."""
