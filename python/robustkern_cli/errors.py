"""Errors the command maps to exit codes, and the probe for library parts that may not exist yet.

Exit codes (``robustkern <command>``): 0 ok, 2 usage or configuration error, 3 data missing or unreadable,
4 a method whose library part is not available yet.
"""
from __future__ import annotations

import importlib

__all__ = [
    "EXIT_OK", "EXIT_USAGE", "EXIT_DATA", "EXIT_UNAVAILABLE",
    "ConfigError", "DataMissingError", "DataFormatError", "MethodUnavailable", "library_part",
]

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_UNAVAILABLE = 4


class ConfigError(ValueError):
    """A configuration file, override or argument is invalid (exit code 2)."""


class DataMissingError(FileNotFoundError):
    """A data set's files are not where they were looked for (exit code 3)."""


class DataFormatError(ValueError):
    """A data file exists but is not in the expected format (exit code 3)."""


class MethodUnavailable(RuntimeError):
    """A method needs a part of the robustkern library that this installation lacks (exit code 4)."""


def library_part(module: str, *attrs: str, purpose: str):
    """Import ``module`` and return it, or raise :class:`MethodUnavailable` naming what is missing.

    ``attrs`` are names the module must define; ``purpose`` says what they are needed for (it goes into the
    message, e.g. ``"training method 'ibp'"``).
    """
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:  # only the module itself being absent counts as "not available"
        missing = getattr(exc, "name", None)
        if missing and not (module == missing or module.startswith(missing + ".")):
            raise
        raise MethodUnavailable(
            f"{purpose} needs {module} ({', '.join(attrs) or 'module'}), which is not available in this "
            f"installation of robustkern yet") from None
    lacking = [a for a in attrs if not hasattr(mod, a)]
    if lacking:
        raise MethodUnavailable(
            f"{purpose} needs {module}.{', '.join(lacking)}, which {module} does not provide yet")
    return mod
