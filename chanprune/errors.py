"""The exception type users see for bad input, and the warning categories callers may filter."""


class ChanpruneError(ValueError):
    """Bad input or an impossible request; the message says what was wrong and what to do."""


class UnreachableSpeedup(ChanpruneError):
    """The speed-up asked for is beyond what every prunable layer at its narrowest choice gives."""


class SparseSamplesWarning(UserWarning):
    """Some layers were fitted on fewer than 3 samples per kept input: held-out error may be high."""


def error_line(err: BaseException) -> str:
    """An exception as "Type: first line of its message" (torch's messages often run to many lines)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"
