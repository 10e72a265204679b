"""
Reading the ini files of the services: one place that turns an unreadable
or malformed file into an error naming the file.
"""

from __future__ import annotations

import configparser
from collections.abc import Callable
from pathlib import Path
from typing import Any


def read_ini(path: Path, error: Callable[[str], Exception], *, what: str = "configuration",
             kind: str = "ini file", **options: Any) -> configparser.ConfigParser:
    """Parse ``path``; failures become ``error(message)`` naming the file."""
    parser = configparser.ConfigParser(interpolation=None, **options)
    try:
        with open(path, encoding="utf-8") as source:
            parser.read_file(source)
    except OSError as failure:
        raise error(f"cannot read the {what} {path}: {failure.strerror or failure}") from None
    except configparser.Error as failure:
        raise error(f"{path} is not a valid {kind}: {failure}") from None
    return parser


def read_section(path: Path, section: str, error: Callable[[str], Exception]) -> configparser.SectionProxy:
    """The section ``[section]`` of the ini file ``path``, which must have it."""
    parser = read_ini(path, error)
    if not parser.has_section(section):
        raise error(f"{path} has no [{section}] section")
    return parser[section]
