"""a2n: image super-resolution with the Attention in Attention Network (A2N)."""

__version__ = "0.1.0"


class A2NError(Exception):
    """Base of the errors a user can fix; the command line prints them as one line."""
