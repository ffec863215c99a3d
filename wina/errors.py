"""One exception type for every user-facing failure, so the CLIs can print one line and exit non-zero."""

import functools
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class WinaError(Exception):
    """Bad input or an unsupported model; the message names the cause in one line."""


def one_line_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """CLI wrapper: a `WinaError` becomes `error: <cause>` on stderr and exit status 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except WinaError as e:
            import click

            click.echo(f"error: {e}", err=True)
            sys.exit(1)

    return wrapper
