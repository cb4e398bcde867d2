"""The one exception type the command-line entry points turn into a one-line message."""


class UserError(Exception):
    """A problem with the user's input (paths, flags, data, checkpoints).

    The CLI prints it as ``error: <message>`` and exits non-zero with no traceback, so the
    message itself must name the problem and, where there is one, the fix.
    """
