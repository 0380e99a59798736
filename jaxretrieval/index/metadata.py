"""Item metadata and search filters: what they may hold, and how a filter finds its items.

Metadata. An item may carry one small JSON object, e.g. `{"label": "cat", "year": 2024}`:
at most MAX_METADATA_FIELDS fields, each named by a non-empty string of at most
MAX_FIELD_NAME_CHARS characters, each value a string, an integer, a finite float, a boolean,
null, or a flat list of those (at most MAX_LIST_VALUES); at most MAX_METADATA_BYTES bytes as
compact UTF-8 JSON. An item without metadata has None.

Filters. A filter is a JSON object of conditions on fields, all of which must hold (AND):

    {"label": "cat"}                          the field equals "cat"
    {"year": {"in": [2023, 2024]}}            the field equals one of the listed values
    {"label": "cat", "year": {"in": [2024]}}  both

A value compares equal to a value of the same JSON kind: 1 and 1.0 are equal, `true` and 1
are not, "1" and 1 are not. A field holding a list passes when any of its elements equals a
value of the condition (tags). An item lacking the field does not pass; `null` matches a
field that holds null. An empty filter (`{}`) passes every item.

Checks raise BadMetadataError or BadFilterError, both JaxRetrievalError, saying what to change.
"""

import json
import math

import numpy as np

from jaxretrieval.errors import JaxRetrievalError

MAX_METADATA_BYTES = 4096
MAX_METADATA_FIELDS = 64
MAX_FIELD_NAME_CHARS = 256
MAX_LIST_VALUES = 256
MAX_FILTER_FIELDS = 32
MAX_FILTER_VALUES = 1024

METADATA_RULE = (
    "metadata must be a JSON object of at most "
    f"{MAX_METADATA_FIELDS} fields with non-empty string names, whose values are strings, "
    "integers, finite numbers, booleans, null or flat lists of those, and at most "
    f"{MAX_METADATA_BYTES} bytes as compact JSON, e.g. {{\"label\": \"cat\", \"year\": 2024}}")
FILTER_RULE = (
    "a filter is a JSON object mapping field names to a value (the field equals it) or to "
    "{\"in\": [values]} (the field equals one of them), all conditions combined with AND, "
    "e.g. {\"label\": \"cat\", \"year\": {\"in\": [2023, 2024]}}; values are strings, numbers, "
    "booleans or null")


class BadMetadataError(JaxRetrievalError):
    """Metadata that breaks METADATA_RULE."""


class BadFilterError(JaxRetrievalError):
    """A search filter that breaks FILTER_RULE."""


def _is_scalar(value):
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (str, int, bool))


def token(value):
    """A hashable stand-in for a scalar, equal exactly when the JSON values are equal.

    Booleans stand apart from numbers (Python has True == 1); 1 and 1.0 share a token.
    """
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("number", value)
    if value is None:
        return ("null", None)
    return ("str", value)


def checked_metadata(metadata, what="metadata"):
    """`metadata` as a plain dict (or None), or a BadMetadataError naming what is wrong."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise BadMetadataError(f"{what} is {type(metadata).__name__}, not an object; "
                               f"{METADATA_RULE}")
    if len(metadata) > MAX_METADATA_FIELDS:
        raise BadMetadataError(f"{what} has {len(metadata)} fields; {METADATA_RULE}")
    for name, value in metadata.items():
        if not isinstance(name, str) or not name or len(name) > MAX_FIELD_NAME_CHARS:
            raise BadMetadataError(
                f"{what} has the field name {name!r}: names must be non-empty strings of at "
                f"most {MAX_FIELD_NAME_CHARS} characters; {METADATA_RULE}")
        if isinstance(value, (list, tuple)):
            if len(value) > MAX_LIST_VALUES:
                raise BadMetadataError(
                    f"{what} field {name!r} lists {len(value)} values, more than "
                    f"{MAX_LIST_VALUES}; {METADATA_RULE}")
            bad = next((item for item in value if not _is_scalar(item)), _NOTHING)
        else:
            bad = value if not _is_scalar(value) else _NOTHING
        if bad is not _NOTHING:
            shown = bad if isinstance(bad, float) else type(bad).__name__
            raise BadMetadataError(f"{what} field {name!r} holds {shown}; {METADATA_RULE}")
    try:
        text = json.dumps(metadata, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":"))
        size = len(text.encode("utf-8"))
    except (TypeError, ValueError, UnicodeEncodeError) as error:
        raise BadMetadataError(f"{what} cannot be written as JSON ({error}); "
                               f"{METADATA_RULE}") from None
    if size > MAX_METADATA_BYTES:
        raise BadMetadataError(f"{what} is {size} bytes as JSON, more than "
                               f"{MAX_METADATA_BYTES}; {METADATA_RULE}")
    # A JSON round trip: tuples become lists, and what is stored is what a load gives back.
    return json.loads(text)


_NOTHING = object()


def checked_metadata_list(metadata, count):
    """One metadata object (or None) per row as a list, or None when `metadata` is None
    or holds no object at all."""
    if metadata is None:
        return None
    if isinstance(metadata, dict):
        raise BadMetadataError("metadata must be a list with one object (or None) per item, "
                               "not one object")
    try:
        values = list(metadata)
    except TypeError:
        raise BadMetadataError(f"metadata must be a list with one object (or None) per item, "
                               f"got {type(metadata).__name__}") from None
    if len(values) != count:
        raise BadMetadataError(f"got {count} items but {len(values)} metadata entries; pass "
                               "exactly one (an object or None) per item")
    checked = [checked_metadata(value, f"metadata of row {row}")
               for row, value in enumerate(values)]
    return checked if any(value is not None for value in checked) else None


def checked_filter(conditions):
    """`conditions` as {field: frozenset of value tokens}, or None for no filter (None, {})."""
    if conditions is None:
        return None
    if not isinstance(conditions, dict):
        raise BadFilterError(f"the filter is {type(conditions).__name__}, not an object; "
                             f"{FILTER_RULE}")
    if len(conditions) > MAX_FILTER_FIELDS:
        raise BadFilterError(f"the filter has {len(conditions)} conditions, more than "
                             f"{MAX_FILTER_FIELDS}; {FILTER_RULE}")
    checked = {}
    for name, condition in conditions.items():
        if not isinstance(name, str) or not name:
            raise BadFilterError(f"the filter names the field {name!r}; {FILTER_RULE}")
        if isinstance(condition, dict):
            if set(condition) != {"in"} or not isinstance(condition["in"], (list, tuple)):
                raise BadFilterError(
                    f"the condition on {name!r} is {_short(condition)}: the only operator "
                    f"is {{\"in\": [values]}}; {FILTER_RULE}")
            values = list(condition["in"])
            if len(values) > MAX_FILTER_VALUES:
                raise BadFilterError(f"the condition on {name!r} lists {len(values)} values, "
                                     f"more than {MAX_FILTER_VALUES}")
        else:
            values = [condition]
        bad = next((value for value in values if not _is_scalar(value)), _NOTHING)
        if bad is not _NOTHING:
            raise BadFilterError(f"the condition on {name!r} compares with {_short(bad)}; "
                                 f"{FILTER_RULE}")
        checked[name] = frozenset(token(value) for value in values)
    return checked or None


def _short(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def tokens_of(value):
    """The tokens a stored field value answers to: one per element of a list."""
    if isinstance(value, list):
        return {token(item) for item in value}
    return {token(value)}


def passes(metadata, conditions):
    """Whether one item's metadata (a dict or None) passes checked `conditions`."""
    if metadata is None:
        return False
    for name, wanted in conditions.items():
        if name not in metadata or wanted.isdisjoint(tokens_of(metadata[name])):
            return False
    return True


class Postings:
    """Field -> value token -> the sorted rows holding it, over an immutable list of
    metadata (a searcher's base rows). Built once, then only read."""

    def __init__(self, metadata):
        lists = {}
        for row, item in enumerate(metadata):
            if item is None:
                continue
            for name, value in item.items():
                by_value = lists.setdefault(name, {})
                for value_token in tokens_of(value):
                    by_value.setdefault(value_token, []).append(row)
        self._count = len(metadata)
        self._rows = {name: {value_token: np.asarray(rows, np.int64)
                             for value_token, rows in by_value.items()}
                      for name, by_value in lists.items()}

    def mask(self, conditions):
        """A bool array over the rows: True where every condition holds."""
        result = None
        for name, wanted in conditions.items():
            field = np.zeros(self._count, bool)
            by_value = self._rows.get(name, {})
            for value_token in wanted:
                rows = by_value.get(value_token)
                if rows is not None:
                    field[rows] = True
            result = field if result is None else result & field
            if not result.any():
                break
        return result
