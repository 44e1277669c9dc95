"""The one exception type that reaches the user as a single line."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix.

    The command line prints ``error: <message>`` and exits with status 2 instead of a traceback.
    """
