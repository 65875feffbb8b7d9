"""The base classes of effopd's errors. Modules subclass them where the error is raised; the CLI
reports a ``UserError`` (the input was wrong) as one line with exit code 2, and anything else
(a bug) with a traceback. Torch-free, so that importing it costs nothing."""


class UserError(Exception):
    """The input was wrong (a path, a value, a file's content): one line names the input, what
    was wrong and what to do next. Exit code 2."""

    exit_code = 2


class RunStopped(Exception):
    """A run stopped before its end for a reason the message states (a signal, non-finite
    losses); exit code in ``exit_code``."""

    exit_code = 1
    prefix = "error: "
