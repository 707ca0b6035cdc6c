"""offload_runtime: lossless long-context generation with a host-resident KV cache (TriForce)."""
__version__ = "0.1.0"
