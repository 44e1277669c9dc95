"""The one exception type that reaches the user as a single line."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix.

    The command line prints ``error: <message>`` and exits with status 2 instead of a traceback. Line breaks
    in the message (from user input echoed back) are shown as \\n so the message stays one line.
    """

    def __str__(self) -> str:
        text = super().__str__()
        return text.replace("\r", "\\r").replace("\n", "\\n")
