"""The precision an index keeps its embeddings in: float32, float16 or int8.

An index built with `embedding_dtype` other than float32 stores its snapshot rows in that
type (`embeddings.npy`; for int8 also `embedding_scales.npy`) and has ScaNN score them in
its compact types: int8 rows are ScaNN's fixed-point int8 (one multiplier per dimension),
float16 rows bfloat16, ScaNN's 16-bit type (it has no float16). Both apply to the exact
search and to the reordering of the approximate one; the settings record the choice as
`embedding_dtype` (absent: float32, as every index built before the option).

int8 rows carry one float32 scale each (the row's largest magnitude / 127): every row
uses the whole int8 range whatever its largest component, and each row is encoded
alone, so an upsert or compaction never re-encodes the others. The scale costs 4 bytes
a row; a 64-dimensional row is 68 bytes instead of 256.

Rows are searched as they are stored: a base row is rounded to its stored precision
when the searcher is built, so an index searches the same before and after a reload.
Rows not yet compacted (the delta and the write-ahead log) stay float32.
"""

import numpy as np

from jaxretrieval.errors import JaxRetrievalError

EMBEDDING_DTYPES = ("float32", "float16", "int8")
DEFAULT = "float32"
SCALES_FILE = "embedding_scales.npy"
INT8_MAX = 127


def checked_dtype(name) -> str:
    """`name` if it is one of EMBEDDING_DTYPES; JaxRetrievalError saying which to use."""
    if name not in EMBEDDING_DTYPES:
        raise JaxRetrievalError(
            f"embedding_dtype={name!r}; use one of {', '.join(EMBEDDING_DTYPES)}")
    return name


def dtype_of(settings) -> str:
    """The embedding dtype that ScaNN settings record (float32 when they do not)."""
    return settings.get("embedding_dtype", DEFAULT)


def encode(vectors: np.ndarray, dtype: str):
    """(rows as stored, int8 scales or None) of float32 `vectors` [n, d]."""
    vectors = np.asarray(vectors, np.float32)
    if dtype == "float32":
        return vectors, None
    if dtype == "float16":
        return vectors.astype(np.float16), None
    peak = np.max(np.abs(vectors), axis=1) if vectors.size else np.zeros(len(vectors))
    scales = (np.where(peak > 0, peak, 1.0) / INT8_MAX).astype(np.float32)
    codes = np.clip(np.rint(vectors / scales[:, None]), -INT8_MAX, INT8_MAX)
    return codes.astype(np.int8), scales


def decode(stored: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """float32 rows from their stored form (`encode`'s result)."""
    if scales is None:
        return np.ascontiguousarray(stored, np.float32)
    return np.ascontiguousarray(stored.astype(np.float32) * scales[:, None])


def rounded(vectors: np.ndarray, dtype: str) -> np.ndarray:
    """`vectors` as they read back once stored in `dtype` (float32 rows)."""
    if dtype == "float32":
        return vectors
    return decode(*encode(vectors, dtype))


def stored_bytes(count: int, dim: int, dtype: str) -> int:
    """The bytes of `count` rows of `dim` numbers stored in `dtype`, scales included."""
    return count * (dim * np.dtype(dtype).itemsize + (4 if dtype == "int8" else 0))
