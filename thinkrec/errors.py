"""One type for what goes wrong on the user's side: their arguments, input files, run directory or machine.

Every such error of the project is a `UserError` (DataError, ArtifactError, RunError, ModelLoadError, ...; each
keeps its old base, ValueError or RuntimeError, too): its message names the argument, file or line and what to
do, so a CLI prints it on one line and exits with status 2. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """The user's arguments, files or machine cannot work; the message is the whole story."""


class UsageError(UserError, ValueError):
    """An argument or input that cannot work, found before the long work starts."""


# what every CLI reports as one line: ours, and a path the user named that does not exist or is of the wrong kind
# (the OS error's message names it)
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def number(kind, low, inclusive=True):
    """An argparse type: a finite `kind` (int or float) >= low (> low when not inclusive)."""
    import argparse
    import math

    def parse(text):
        value = kind(text)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} must be a finite number")
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"{text} must be {'>=' if inclusive else '>'} {low}")
        return value
    parse.__name__ = kind.__name__  # argparse's "invalid int value: 'x'"
    return parse


def report(prog: str, error: BaseException) -> int:
    """Print a user error as the one line every CLI prints, `PROG: error: MESSAGE`; returns the exit status, 2."""
    import sys

    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2


def run_cli(prog: str, main, argv=None) -> None:
    """A CLI's entry point: main(argv); a user error (USER_ERRORS) ends the process with `report`'s line and
    status 2, anything else keeps its traceback."""
    import sys

    try:
        main(argv)
    except USER_ERRORS as e:
        sys.exit(report(prog, e))
