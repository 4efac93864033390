"""Errors a user can cause and fix. The CLI prints them as one line, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment; ``exit_code`` is the process's."""

    exit_code = 1


class ConfigError(UserError):
    """A config value that is not allowed: names the key, the value and what is allowed."""

    exit_code = 2


class DataError(UserError):
    """Data that is missing, unreadable or cannot be downloaded."""

    exit_code = 1


class Diverged(UserError):
    """A non-finite loss or gradient: the step was not applied and the run stopped."""

    exit_code = 3

    def __init__(self, step: int, loss: float, grad_norm: float):
        super().__init__(
            f"training diverged at step {step} (loss {loss}, gradient norm {grad_norm}); the step was "
            "not applied and the last good checkpoint is kept. Try a lower optim.optimizer.lr, "
            "a larger loss.temperature, or trainer.grad_clip=1.0"
        )
        self.step = step


class RunExists(ConfigError):
    """The chosen run directory already holds a run (it is left untouched)."""


class Refused(UserError):
    """A command refused before it changed anything in the run directory (a resume whose
    config no longer fits the checkpoint, a directory in use): no failure is recorded there."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class CheckpointError(UserError):
    """A checkpoint that cannot be written, or is missing, damaged or unsafe to load."""

    exit_code = 1
