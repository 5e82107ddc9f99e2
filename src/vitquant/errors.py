"""User-facing errors: one clear line, no traceback, non-zero exit (see ``cli.main``)."""


class VitquantError(Exception):
    """A problem with the user's input or environment, reported as one line by the CLI."""
