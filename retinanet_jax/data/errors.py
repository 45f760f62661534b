"""The one exception type of the data package."""


class DataError(ValueError):
    """A bad image or annotation record; the message names the file and the record."""
