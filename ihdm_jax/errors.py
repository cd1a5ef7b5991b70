"""The errors that end a job with one line, `Error: <message>`, and exit status 1.

They sit below every other module so that any layer can raise them. Anything else that escapes a
job is a bug and keeps its traceback.
"""


class JobError(Exception):
    """A failure whose message says all the user needs to know."""


class UserError(JobError):
    """A mistake in the input that the user can fix; the message names the bad value and says
    what was expected."""


class Diverged(JobError):
    """The loss or the gradients of a training step were NaN or infinite."""


class SaveFailed(JobError):
    """A checkpoint could not be written (e.g. a full disk); the previous one is intact."""
