"""The transfer scheduler (pinned host pools, copy streams, layer prefetch) and its CPU backend."""
