"""Errors a user causes (a bad argument, file or checkpoint), as opposed to bugs.

``arzoo`` subcommands print these as one line (``arzoo <cmd>: <message>``) and exit with
status 2 instead of showing a traceback; ``ARZOO_DEBUG=1`` shows the traceback.
"""


class UserError(ValueError):
    """A bad argument, file or setting, with a message that names it. Raise it from any arzoo
    code path for an error the user can fix; its message is all the CLI prints."""
