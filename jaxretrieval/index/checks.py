"""Checks of what callers hand an index: embeddings, queries, keys, sources, manifest entries.

Each check returns the value in the form the index stores (a contiguous float32 array, a
list of plain str, a JSON-normalised dict) or raises a JaxRetrievalError that says what
to change. Numbers must be numbers: booleans, strings ("1.5") and other objects are refused
rather than converted, and so are values beyond float32's range. The rules for keys are
in `keys`.
"""

import json
import math
import operator

import numpy as np

from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.index.keys import check_keys

NORM_TOLERANCE = 1e-2

# Keys the index itself maintains; callers may add any others.
CORE_MANIFEST_KEYS = frozenset({
    "format_version", "embedding_dim", "count", "checkpoint_step",
    "model_config_hash", "scann_version", "distance", "scann",
})


def refuse_non_numbers(values, what):
    """Raises unless `values` (an array, or nested lists of them and of scalars) holds only
    real numbers: no booleans, strings, None or other objects."""
    pending = [values]
    while pending:
        value = pending.pop()
        if isinstance(value, np.ndarray):
            if value.dtype.kind in "iuf":
                continue
            if value.dtype.kind != "O":
                raise JaxRetrievalError(
                    f"{what} must hold numbers, but an array of dtype {value.dtype} was given")
            pending.extend(value.ravel().tolist())
        elif isinstance(value, (list, tuple)):
            pending.extend(value)
        elif isinstance(value, (bool, np.bool_)) or not isinstance(
                value, (int, float, np.integer, np.floating)):
            raise JaxRetrievalError(
                f"{what} must hold numbers (JSON numbers), but hold {type(value).__name__} "
                f"{_short_repr(value)}")


def _short_repr(value):
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def as_float_matrix(values, what):
    """`values` as a float32 array (of any shape), or an error naming `what`."""
    refuse_non_numbers(values, what)
    try:
        with np.errstate(over="ignore"):  # too large becomes inf, refused as not finite
            return np.asarray(values, dtype=np.float32)
    except OverflowError:
        raise JaxRetrievalError(
            f"{what} hold an integer too large for a float; values must lie within "
            "float32's range (about +-3.4e38)") from None
    except (TypeError, ValueError) as error:
        raise JaxRetrievalError(
            f"{what} must be numeric float arrays; converting failed: {error}"
        ) from None


def normalised_vector(values, dim, what="embedding"):
    """A list of `dim` numbers as a unit float32 vector (the service's embeddings).

    Scaled by its largest magnitude before the norm is taken, so that values near float32's
    limit (1e38) do not overflow the norm, nor tiny ones underflow it.
    """
    if not isinstance(values, (list, tuple, np.ndarray)):
        raise JaxRetrievalError(f"{what} must be a list of {dim} numbers")
    if len(values) != dim:
        raise JaxRetrievalError(f"{what} must be {dim} numbers, got {len(values)}")
    nested = next((value for value in values if isinstance(value, (list, tuple, dict))), None)
    if nested is not None:
        raise JaxRetrievalError(
            f"{what} must be a flat list of {dim} numbers, but holds a {type(nested).__name__}")
    vector = as_float_matrix(values, what)
    if vector.shape != (dim,):
        raise JaxRetrievalError(
            f"{what} must be {dim} numbers, got shape {list(vector.shape)}")
    if not np.isfinite(vector).all():
        raise JaxRetrievalError(
            f"{what} must hold finite numbers within float32's range (about +-3.4e38)")
    largest = float(np.max(np.abs(vector)))
    if largest == 0:
        raise JaxRetrievalError(f"{what} must not be all zeros")
    scaled = vector.astype(np.float64) / largest
    return (scaled / np.linalg.norm(scaled)).astype(np.float32)


def check_finite(array, what):
    if not np.isfinite(array).all():
        bad_row = int(np.argwhere(~np.isfinite(array))[0][0])
        raise JaxRetrievalError(
            f"{what} contain NaN or infinite values, or values beyond float32's range "
            f"(first at row {bad_row}); check the model outputs before indexing or "
            "searching")


def checked_embeddings(embeddings, *, index_dim=None):
    """`embeddings` as a contiguous float32 [n, d] array of unit rows.

    With `index_dim` (adding to an existing index) d must equal it and n
    may be 0; without it (building) the gallery may not be empty.
    """
    array = as_float_matrix(embeddings, "embeddings")
    if array.ndim != 2:
        raise JaxRetrievalError(
            f"embeddings must have shape [count, dim], got shape {array.shape}")
    count, dim = array.shape
    if index_dim is None and count == 0:
        raise JaxRetrievalError(
            "the gallery is empty: pass at least one embedding to Index.build")
    if dim == 0:
        raise JaxRetrievalError("embeddings have dimension 0")
    if index_dim is not None and dim != index_dim:
        raise JaxRetrievalError(
            f"embeddings have dimension {dim} but the index has dimension "
            f"{index_dim}; embed them with the same model that built the index")
    check_finite(array, "embeddings")
    norms = np.linalg.norm(array, axis=1)
    off = np.abs(norms - 1.0) > NORM_TOLERANCE
    if off.any():
        bad_row = int(np.argmax(off))
        raise JaxRetrievalError(
            f"embeddings must be L2-normalised (scores are dot products), but "
            f"row {bad_row} has norm {norms[bad_row]:.4f}; divide each row "
            "by its norm before adding it to the index")
    return np.ascontiguousarray(array)


def checked_queries(queries, dim):
    """`queries` ([m, dim] or one [dim] vector) as a contiguous float32 [m, dim] array."""
    array = as_float_matrix(queries, "queries")
    if array.ndim == 1:
        array = array[np.newaxis, :]
    if array.ndim != 2:
        raise JaxRetrievalError(
            f"queries must have shape [m, {dim}] or [{dim}], got shape "
            f"{array.shape}")
    if array.shape[1] != dim:
        raise JaxRetrievalError(
            f"queries have dimension {array.shape[1]} but the index has "
            f"dimension {dim}; embed queries with the same "
            "model that built the index")
    check_finite(array, "queries")
    return np.ascontiguousarray(array)


def checked_threshold(threshold):
    """A search's score threshold as a float, or None."""
    if threshold is None:
        return None
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = math.nan
    if math.isnan(value):
        raise JaxRetrievalError(f"threshold must be a number or None, got {threshold!r}")
    return value


def checked_string_list(values, what):
    if isinstance(values, (str, bytes)):
        raise JaxRetrievalError(f"{what} must be a list of strings, not one string")
    try:
        strings = list(values)
    except TypeError:
        raise JaxRetrievalError(
            f"{what} must be a list of strings, got {type(values).__name__}") from None
    for row, value in enumerate(strings):
        if not isinstance(value, str):
            raise JaxRetrievalError(
                f"{what} must be strings, but row {row} is "
                f"{type(value).__name__} {value!r}")
    # Plain str, so numpy string scalars don't leak out through `keys`.
    return [str(value) for value in strings]


def checked_strings(values, count, what):
    strings = checked_string_list(values, what)
    if len(strings) != count:
        raise JaxRetrievalError(
            f"got {count} embeddings but {len(strings)} {what}; "
            "pass exactly one per embedding row")
    return strings


def row_by_key(keys):
    """{key: row} of unique `keys`; a repeated key is an error."""
    rows = {}
    for row, key in enumerate(keys):
        if key in rows:
            raise JaxRetrievalError(
                f"duplicate key {key!r} at rows {rows[key]} and {row}; "
                "every gallery item needs a unique key")
        rows[key] = row
    return rows


def checked_rows(embeddings, keys, sources, dim=None):
    """(embeddings, keys, sources) to build or upsert, checked: one unique key (and
    source) per row of unit vectors (of `dim` dimensions, when given)."""
    embeddings = checked_embeddings(embeddings, index_dim=dim)
    keys = check_keys(checked_strings(keys, len(embeddings), "keys"))
    row_by_key(keys)
    if sources is not None:
        sources = checked_strings(sources, len(keys), "sources")
    return embeddings, keys, sources


def json_normalised(value, what):
    # A JSON round trip now means the manifest compares equal after load
    # (tuples become lists, etc.) and bad values fail here, not in save().
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise JaxRetrievalError(
            f"{what} must be JSON-serialisable (plain dicts, lists, str, int, "
            f"finite float): {error}") from None


def refuse_reserved_keys(updates, reserved, what, owner="index"):
    clashing = sorted(reserved.intersection(updates))
    if clashing:
        raise JaxRetrievalError(
            f"{what} may not set {', '.join(clashing)}: the {owner} maintains those itself")


def checked_manifest_updates(updates, what):
    refuse_reserved_keys(updates, CORE_MANIFEST_KEYS, what)
    return json_normalised(dict(updates), what)


def refuse_unknown_keys(unknown):
    """A delete names keys that are not there: refused whole, so nothing is deleted."""
    if unknown:
        named = ", ".join(repr(key) for key in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise JaxRetrievalError(
            f"cannot delete {named}{more}: not in the index (nothing was deleted); check "
            "the keys against index.keys")


def checked_positive_int(value, what):
    if isinstance(value, bool):
        raise JaxRetrievalError(f"{what} must be an integer >= 1, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise JaxRetrievalError(f"{what} must be an integer >= 1, got {value!r}") from None
    if value < 1:
        raise JaxRetrievalError(f"{what} must be an integer >= 1, got {value}")
    return value


def checked_target_recall(target):
    value = math.nan
    if not isinstance(target, bool):
        try:
            value = float(target)
        except (TypeError, ValueError):
            pass
    if not 0.0 < value <= 1.0:  # NaN fails this too
        raise JaxRetrievalError(
            f"target_recall must be a number in (0, 1], e.g. 0.95, got {target!r}")
    return value
