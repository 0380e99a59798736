"""What an item's key (the service's item id) may be, and how a stored key that breaks the
rules is shown and named again.

A key is non-empty Unicode text of at most MAX_KEY_BYTES bytes in UTF-8, without control
characters (category Cc: U+0000-U+001F and U+007F-U+009F) and without lone surrogates
(U+D800-U+DFFF, which UTF-8 cannot encode, so no JSON answer or URL could carry them).
Format characters (category Cf: the zero-width joiner inside emoji sequences, the soft
hyphen, bidirectional marks) and unassigned code points are allowed: names in real use need
the former, and what counts as unassigned changes with Python's Unicode version. Keys are
compared code point by code point, without Unicode normalisation.

Every build and upsert checks its keys (`check_keys`). Loading does not, so an index that
already holds a key breaking the rules (written before them, or by hand) still opens; such
a key stays searchable and deletable. `shown_key` writes each forbidden character of it as
the six characters `\\uXXXX` (lowercase hex), so that UTF-8, JSON and a URL path can carry it,
and `stored_key` maps that form back.
"""

import re

from jaxretrieval.errors import JaxRetrievalError

MAX_KEY_BYTES = 1024
# UTF-8 needs at most 4 bytes per code point: a key this short is never too long.
_ALWAYS_SHORT_ENOUGH = MAX_KEY_BYTES // 4
_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SHOWN_FORBIDDEN = re.compile(r"\\u(00[01][0-9a-f]|007f|00[89][0-9a-f]|d[89a-f][0-9a-f]{2})",
                              re.IGNORECASE)

KEY_RULE = (f"a key (item id) must be non-empty text of at most {MAX_KEY_BYTES} bytes in "
            "UTF-8, without control characters (U+0000-U+001F, U+007F-U+009F) or lone "
            "surrogates (U+D800-U+DFFF)")


def key_problem(key):
    """What is wrong with `key` under the rules above, or None."""
    if not isinstance(key, str):
        return f"it is {type(key).__name__}, not a string"
    if not key:
        return "it is empty"
    bad = _FORBIDDEN.search(key)
    if bad is not None:
        kind = "a lone surrogate" if _SURROGATE.match(bad.group()) else "a control character"
        return f"it holds {kind}, U+{ord(bad.group()):04X}, at position {bad.start()}"
    if len(key) > _ALWAYS_SHORT_ENOUGH:
        size = len(key.encode("utf-8"))
        if size > MAX_KEY_BYTES:
            return f"it is {size} bytes long in UTF-8"
    return None


def check_key(key, what="key"):
    """`key`, or a JaxRetrievalError that names the rule it breaks."""
    problem = key_problem(key)
    if problem is not None:
        raise JaxRetrievalError(f"invalid {what} {_quoted(key)}: {problem}; {KEY_RULE}")
    return key


def check_keys(keys, what="keys"):
    """`keys` (a list of strings), or a JaxRetrievalError naming the first bad one's row."""
    if keys and not _all_plainly_valid(keys):
        for row, key in enumerate(keys):
            problem = key_problem(key)
            if problem is not None:
                raise JaxRetrievalError(
                    f"invalid {what[:-1]} {_quoted(key)} at row {row}: {problem}; {KEY_RULE}")
    return keys


def _all_plainly_valid(keys):
    # Checked together: one C-speed pass over a gallery's millions of keys.
    try:
        joined = "".join(keys)
    except TypeError:
        return False  # not all strings
    return (_FORBIDDEN.search(joined) is None and min(map(len, keys)) > 0
            and max(map(len, keys)) <= _ALWAYS_SHORT_ENOUGH)


def shown_key(key):
    """`key` as UTF-8, JSON and a URL path can carry it: each control character or lone
    surrogate as the text `\\uXXXX` (a valid key is returned as it is)."""
    return _FORBIDDEN.sub(lambda match: f"\\u{ord(match.group()):04x}", key)


def stored_key(shown):
    """The key that `shown_key` showed as `shown`, if `shown` holds a `\\uXXXX` escape of a
    forbidden character; else None."""
    key, count = _SHOWN_FORBIDDEN.subn(lambda match: chr(int(match.group(1), 16)), shown)
    return key if count else None


def _quoted(key):
    text = repr(key)
    return text if len(text) <= 80 else f"{text[:60]}...' ({len(key)} characters)"
