"""Fast paths for the TopK family: fused/chunked encode and sparse decode (see topk_encode.py)."""

from saelab.kernels.sparse_decode import sparse_decode
from saelab.kernels.topk_encode import topk_encode, topk_encode_reference

__all__ = ["sparse_decode", "topk_encode", "topk_encode_reference"]
