"""The Triton kernels, imported once, lazily (kernels.load_triton), after TRITON_INTERPRET is settled.

They run compiled on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before this
module was imported (the tests; triton_common.py checks that triton agrees). Each public function
has the signature of its `*_reference` twin in reference.py. The kernels live by job:
- triton_attention.py: attention over a KV set, decode and prefill (`attention_triton`), and over
  one slab (`attention_partial_triton`);
- triton_merge.py: merging partial attentions (the key splits of one call; `merge_partials_triton`);
- triton_chunks.py: chunk scores and the retrieval selection (`chunk_scores_triton`, `select_chunks_triton`);
- triton_common.py: what their host code shares (buffers, tile sizes, argument checks).
The dispatch (kernels/__init__.py) calls `attention_triton` and `chunk_scores_triton` through this
module, so a test can replace them here. The @triton.jit kernels are named here too, for
bench/kernels_compile_check.py (which compiles each for a GPU).
"""
from __future__ import annotations

from .triton_attention import _attention_kernel, attention_partial_triton, attention_triton
from .triton_chunks import _chunk_scores_kernel, chunk_scores_triton, select_chunks_triton
from .triton_common import INTERPRETED
from .triton_merge import _merge_kernel, merge_partials_triton

__all__ = [
    "attention_triton", "attention_partial_triton", "merge_partials_triton", "chunk_scores_triton",
    "select_chunks_triton", "INTERPRETED", "_attention_kernel", "_merge_kernel", "_chunk_scores_kernel",
]
