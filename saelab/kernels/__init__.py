"""Fast paths for the TopK family: the TopK encode (``topk_encode.py``, its paths in ``reference.py``,
``chunked.py``, ``screened.py``, ``triton_topk.py``, chosen by ``dispatch.py``) and the sparse decode
(``sparse_decode.py``)."""

from saelab.kernels.sparse_decode import sparse_decode
from saelab.kernels.topk_encode import topk_encode, topk_encode_reference

__all__ = ["sparse_decode", "topk_encode", "topk_encode_reference"]
