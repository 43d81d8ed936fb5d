"""Errors a user can act on.

Everything raised as a :class:`CtxpressError` carries a message meant for the
person running ctxpress: the command line prints it as one line and exits
non-zero, the service returns it as a 4xx body. Anything else is a bug.
"""

from __future__ import annotations


class CtxpressError(Exception):
    """A problem with the input or the environment that the user can fix."""


class InputError(CtxpressError, ValueError):
    """Invalid arguments or data (bad budget, empty text, unknown method...)."""


class ModelLoadError(CtxpressError):
    """A model or a package needed to load it is missing."""
