"""The one exception type audiohash raises for bad input, bad config and mismatched artifacts."""


class AudiohashError(Exception):
    """A user-facing error: the message names the file, row, column or key and says what to do."""
