"""One base class for every error the project raises on purpose.

The CLI catches ``PrecomputeError`` and prints its message as one line (``error: ...``); anything
else is an internal error (one line plus the path of a log file holding the traceback). Each
subclass also derives from the built-in class it has always been (``ValueError`` or
``RuntimeError``), so existing ``except ValueError`` code keeps working.

This module imports nothing heavy: the explorer and the run store use it without torch.
"""

from __future__ import annotations


class PrecomputeError(Exception):
    """Base of every project error. The message is one line: what is wrong and how to fix it."""


class ConfigError(PrecomputeError, ValueError):
    """A setting or argument is out of range or unknown (a config field, a chunk size, a device)."""
