"""Checks the bench scripts run on their flags right after parsing: a bad value is one argparse error
naming the flag, before anything is measured (not a traceback, nor a default put in its place, nor a
JSON file that cannot be written found only after the first row)."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def at_least(parser: argparse.ArgumentParser, args: argparse.Namespace, **lowest) -> None:
    """Each flag (dest name) at or above its lowest value; a flag left at None (its default) is not checked."""
    for dest, low in lowest.items():
        value = getattr(args, dest)
        if value is None:
            continue
        flag = f"--{dest.replace('_', '-')}"
        if isinstance(value, float) and not math.isfinite(value):  # nan passed `< low`; each failed later
            parser.error(f"{flag} must be a finite number >= {low}, got {value}")
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")


def positive_ints(parser: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    """A comma list of integers >= 1 ("16,256")."""
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        parser.error(f"{flag} must be integers >= 1, comma-separated; got {text!r}")
    return values


def writable_json(parser: argparse.ArgumentParser, flag: str, path: str | None) -> None:
    """The folder a result file (JSON, a profile table) goes to exists and takes files."""
    if path is None:
        return
    if Path(path).is_dir():  # was found only at the end of the run, when the write failed
        parser.error(f"{flag} {path} is a folder: give a file name (e.g. {Path(path) / 'result.json'})")
    folder = Path(path).parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        parser.error(f"{flag} {path}: folder {folder} does not exist or is not writable")
