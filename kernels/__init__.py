"""Attention and retrieval kernels: pure-PyTorch references (CPU path, test oracle) and Triton versions."""
from .reference import attention_reference, chunk_scores_reference, select_chunks_reference

attention = attention_reference
select_chunks = select_chunks_reference

__all__ = ["attention", "select_chunks", "attention_reference", "chunk_scores_reference", "select_chunks_reference"]
