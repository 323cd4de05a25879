"""The one error type users see, and the helper that quotes a library's own error in it.

The bottom layer: it imports nothing of saelab, and every module may import it.
"""


class SaelabError(Exception):
    """A user-facing error: the message says what went wrong and names the fix.

    The CLI prints it on one line and exits with status 2; no stack trace.
    """


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when it has none), for a one-line error that
    quotes a library's own (safetensors, torch, wandb, transformers); at most ``limit`` characters."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line if limit is None else line[:limit]
