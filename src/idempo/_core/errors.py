"""How a failure is named in idempo's logs and in the errors idempo raises (DESIGN guarantee 7).

SQLAlchemy's ``StatementError`` (and every ``DBAPIError``) renders the statement and its
parameters: for idempo's own statements those parameters are the stored response (headers and
body). The driver's error it wraps (``orig``) says what failed without them.
"""

from __future__ import annotations

__all__ = ["describe", "driver_error"]


def driver_error(exc: BaseException) -> BaseException:
    """The driver's error behind a SQLAlchemy error (its ``orig``), or ``exc`` itself."""
    orig = getattr(exc, "orig", None)
    return orig if isinstance(orig, BaseException) else exc


def describe(exc: BaseException) -> str:
    """``"ClassName: message"`` of a failure, never the parameters of the statement that failed.

    A SQLAlchemy error is named by the driver's error it wraps; one without a
    driver error (a ``StatementError`` raised before the statement was sent) by
    its own class and message, without the statement.
    """
    orig = driver_error(exc)
    if orig is not exc:
        return f"{type(orig).__name__}: {orig}"
    if hasattr(exc, "statement") and hasattr(exc, "params"):
        message = exc.args[0] if exc.args else ""
        return f"{type(exc).__name__}: {message}"
    return f"{type(exc).__name__}: {exc}"
