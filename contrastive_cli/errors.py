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


class CheckpointError(UserError):
    """A checkpoint that cannot be written, or is missing, damaged or unsafe to load."""

    exit_code = 1
