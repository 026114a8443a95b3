"""The one error root: every error a user can fix (a bad option, path, config, data set, checkpoint or
checkout) is a ``UserError``. Each command prints it as one line on stderr and exits with status 2
(``atst_jax.cli.run``); anything else is a bug and keeps its traceback.

Modules name their own subclasses for context (``ConfigError`` for configs, ``AudioError`` for audio files,
``EvalError`` for evaluation inputs, …), all below this root, so a caller can catch every user error at once.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix; its message is one line that says what and where."""


class ConfigError(UserError):
    """A configuration that cannot run; raised before anything is compiled."""
