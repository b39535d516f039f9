"""The exception type users see for bad input, and the warning categories callers may filter."""


class ChanpruneError(ValueError):
    """Bad input or an impossible request; the message says what was wrong and what to do."""


class UnreachableSpeedup(ChanpruneError):
    """The speed-up asked for is beyond what every prunable layer at its narrowest choice gives."""


class SparseSamplesWarning(UserWarning):
    """Some layers were fitted on fewer than 3 samples per kept input: held-out error may be high."""
