"""Errors caused by the user's input. The entry points print them on one line and exit with code 2."""


class UserError(Exception):
    """Bad input: the message names the problem and the fix."""

    exit_code = 2


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass


class TrackingError(UserError):
    """W&B cannot start as asked (online without credentials, ...)."""


class EvaluationError(UserError):
    """FID / IS / KID cannot run as asked (missing feature-extractor weights, unknown extractor, ...)."""


class RunError(Exception):
    """The run cannot go on (disk full, ...): the message says what was kept and what to do. Exit 1."""

    exit_code = 1


class CheckpointWriteError(RunError):
    pass


class DivergenceError(RunError):
    """Losses stopped being finite; the message names the network, the step and the checkpoint."""

    exit_code = 3
