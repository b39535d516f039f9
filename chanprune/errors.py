"""The one exception type users see for bad input: it names the problem and the fix."""


class ChanpruneError(ValueError):
    """Bad input or an impossible request; the message says what was wrong and what to do."""
