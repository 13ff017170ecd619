"""The one exception type that means "the user gave us something we cannot use".

The command line turns it into a one-line message and exit code 2; anything else
is a bug in onnxbn and keeps its traceback.
"""


class UserError(Exception):
    """Bad input or usage. The message says what is wrong and what to do about it."""
