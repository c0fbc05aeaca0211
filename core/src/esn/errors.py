"""One exception type for every mistake a user can make; the CLI prints it as one line."""


class EsnError(Exception):
    """A user-facing error: bad input, bad configuration, a file that does not fit.

    The message names the problem (file, field, value) and, where there is one, the fix.
    """


class LayoutMismatchError(EsnError):
    """An artifact (mask, statistics) was made for a different set of hook points."""


class UsageError(EsnError):
    """The command line itself is wrong: a flag's value, flags that exclude each other, a name on the
    command line that nothing installed has. ``esn`` exits 2 for it (argparse's own errors too), and 1
    for every other EsnError (a file, a model, a run directory that does not fit)."""
