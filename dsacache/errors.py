"""The one exception type users see. The CLI prints it as a single line and exits 2."""


class DsacacheError(Exception):
    """A user-facing error: bad input, a damaged trace, an impossible configuration.

    The message names the offending value and what is allowed.
    """


class TraceError(DsacacheError):
    """A trace directory is missing, damaged or does not follow the format."""
