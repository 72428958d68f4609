"""Errors the command maps to exit codes, and the probes for library parts and optional packages that may be
missing.

Exit codes (``robustkern <command>``): 0 ok, 1 any other failure (one line; ``ROBUSTKERN_TRACEBACK=1`` shows
the traceback), 2 usage or configuration error, 3 data missing or unreadable, 4 a part this installation lacks
(a robustkern library part, or an optional package such as matplotlib), 130 interrupted.
"""
from __future__ import annotations

import importlib

__all__ = [
    "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_DATA", "EXIT_UNAVAILABLE", "EXIT_INTERRUPTED",
    "ConfigError", "DataMissingError", "DataFormatError", "MethodUnavailable", "MissingDependency", "library_part",
    "optional_import", "install_hint",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_UNAVAILABLE = 4
EXIT_INTERRUPTED = 130

# optional packages: the pyproject.toml extra that installs each
EXTRAS = {"scikit-learn": "data", "matplotlib": "plots"}


class ConfigError(ValueError):
    """A configuration file, override or argument is invalid (exit code 2)."""


class DataMissingError(FileNotFoundError):
    """A data set's files are not where they were looked for (exit code 3)."""


class DataFormatError(ValueError):
    """A data file exists but is not in the expected format (exit code 3)."""


class MethodUnavailable(RuntimeError):
    """A method needs a part of the robustkern library that this installation lacks (exit code 4)."""


class MissingDependency(MethodUnavailable):
    """An optional package (scikit-learn, matplotlib) is not installed (exit code 4)."""


def install_hint(package: str) -> str:
    """How to install ``package``: ``pip install P`` and, where one exists, the extra that brings it."""
    extra = EXTRAS.get(package)
    return f"pip install {package}" + (f" (or pip install -e '.[{extra}]' in the checkout)" if extra else "")


def optional_import(module: str, package: str, purpose: str):
    """Import ``module`` of the optional ``package``, or raise :class:`MissingDependency` saying how to install
    it and what needs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(f"{purpose} needs {package}, which is not installed: {install_hint(package)}") \
            from None


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
