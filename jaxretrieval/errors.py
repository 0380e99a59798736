"""The one exception type for mistakes a user can make and fix."""


class JaxRetrievalError(Exception):
    """Bad input, a bad config value, a missing or mismatched file.

    The message always says what is wrong and what to do about it.
    """
