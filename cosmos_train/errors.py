"""User-facing errors.

Anything a user can cause (a bad recipe key, a missing clip, an unknown checkpoint) is raised as a
`UserError`. The CLI prints its message and exits non-zero without a traceback; programming errors
still surface as tracebacks so they get fixed rather than hidden.
"""


class UserError(Exception):
    """An error caused by user input; its message must say what and where (file, line or key)."""


class BadSampleError(UserError):
    """One data sample cannot be used. `reason` is a short category used to count skips."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason
