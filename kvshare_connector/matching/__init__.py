"""Retrieval, token alignment and reuse planning: the lookup side of kvshare."""
