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


class DivergenceError(Exception):
    """Training produced non-finite losses; the message names the network, the step and the checkpoint."""

    exit_code = 3
