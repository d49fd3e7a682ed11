"""One type for what goes wrong on the user's side: their arguments, input files, run directory or machine.

Every such error of the project is a `UserError` (DataError, ArtifactError, RunError, ModelLoadError, ...; each
keeps its old base, ValueError or RuntimeError, too): its message names the argument, file or line and what to
do, so a CLI prints it on one line and exits with status 2. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """The user's arguments, files or machine cannot work; the message is the whole story."""


class UsageError(UserError, ValueError):
    """An argument or input that cannot work, found before the long work starts."""


# what every CLI reports as one line: ours, and a path the user named that does not exist
USER_ERRORS = (UserError, FileNotFoundError)
