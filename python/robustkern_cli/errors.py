"""Errors the command maps to exit codes, and the import of optional third-party packages.

Exit codes (``robustkern <command>``): 0 ok, 1 any other failure (one line; ``--traceback`` shows the
traceback), 2 usage or configuration error, 3 data missing or unreadable, 4 not available: an optional package
that is not installed (scikit-learn, matplotlib), or something robustkern does not do (a method not implemented
yet, a layer bound propagation does not support), 130 interrupted.
"""
from __future__ import annotations

import importlib

__all__ = [
    "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_DATA", "EXIT_NOT_AVAILABLE", "EXIT_INTERRUPTED",
    "ConfigError", "DataMissingError", "DataFormatError", "MissingDependency", "optional_import", "install_hint",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_NOT_AVAILABLE = 4
EXIT_INTERRUPTED = 130

# optional packages: the pyproject.toml extra that installs each
EXTRAS = {"scikit-learn": "data", "matplotlib": "plots", "tensorboard": "tensorboard"}


class ConfigError(ValueError):
    """A configuration file, override or argument is invalid (exit code 2)."""


class DataMissingError(FileNotFoundError):
    """A data set's files are not where they were looked for (exit code 3)."""


class DataFormatError(ValueError):
    """A data file exists but is not in the expected format (exit code 3)."""


class MissingDependency(RuntimeError):
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
