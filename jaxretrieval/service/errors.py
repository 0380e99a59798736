"""The service's one error shape, `{"error": {"code": ..., "message": ...}}`, shared by the
endpoints, the request guard and the HTTP protocol (which answers before any endpoint runs).
"""

import json


class ServiceError(Exception):
    """A refused request: its HTTP status, a stable code for programs, a message for people."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def error_json(code: str, message: str) -> bytes:
    """`error_body` encoded, for answers written without a response class."""
    return json.dumps(error_body(code, message)).encode()
