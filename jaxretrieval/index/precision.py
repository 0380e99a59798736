"""The precision an index keeps its embeddings in: float32, float16 or int8.

An index built with `embedding_dtype` other than float32 stores its snapshot rows in that
type (`embeddings.npy`; for int8 also `embedding_scales.npy`). ScaNN is given those rows
decoded to float32 and keeps its own compact copy: for int8 it quantises them again with
its own fixed-point int8, one multiplier per dimension (not the per-row scales stored
here); float16 rows it keeps in bfloat16, its 16-bit type (it has no float16). ScaNN
scores that copy in the exact search and in the reordering of the approximate one. A
filtered search that takes its exact strategy (jaxretrieval.index.filtered) scores the
decoded float32 rows with numpy instead, and rows not yet compacted (the delta and the
write-ahead log) are scored in float32 as upserted. The settings record the choice as
`embedding_dtype` (absent: float32, as every index built before the option).

int8 rows carry one float32 scale each (the row's largest magnitude / 127): every row
uses the whole int8 range whatever its largest component, and each row is encoded
alone, so an upsert or compaction never re-encodes the others. The scale costs 4 bytes
a row; a 64-dimensional row is 68 bytes instead of 256.

Rows are searched as they are stored: a base row is rounded to its stored precision
when the searcher is built, so an index searches the same before and after a reload.
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

