"""`lvmae` / `python -m lvmae_fast`: one argparse CLI; each feature module registers its subcommands."""
from __future__ import annotations

import argparse
import codecs
import contextlib
import importlib
import logging
import os
import sys

from . import __version__
from .interrupts import caused_by_interrupt, interrupts_noted
from .optional import MissingDependency

# Each module exposes register(subparsers) and sets `func` on the parsers it adds.
COMMAND_MODULES = [
    "lvmae_fast.checkpoint",   # convert-reference
    "lvmae_fast.store_cli",    # store import|info|verify
    "lvmae_fast.train",        # pretrain
    "lvmae_fast.extract",      # extract
    "lvmae_fast.demo",         # demo
]


# What to say when Ctrl-C ends a command (pretrain handles its signals itself: a checkpoint, then exit 130).
INTERRUPTED_HINTS = {
    "extract": "run the same command again to resume: stored videos are skipped, unfinished ones continue "
               "from their saved windows",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lvmae", description="LV-MAE: long-video masked-embedding autoencoders, packed and fast.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"lvmae_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # feature not built yet in this checkout
                continue
            raise
        module.register(sub)
    return parser


def main(argv=None) -> int:
    try:
        with interrupts_noted() as noted:  # torch's start-up would swallow a KeyboardInterrupt
            parser = build_parser()  # imports torch and the feature modules: seconds on a small machine
    except KeyboardInterrupt:
        noted = [True]
    if noted:
        print("lvmae: interrupted while starting", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    with names_printable():
        return _run(parser, args)


def _name_bytes_else_escaped(err: UnicodeError):
    """Encoding error handler: a file name's bytes that are not UTF-8 (os.fsdecode's lone surrogates
    U+DC80..U+DCFF) are written back as those bytes, as `ls` shows them; any other character the stream
    cannot encode is escaped (backslashreplace, Python's default for stderr)."""
    if isinstance(err, UnicodeEncodeError):
        chunk = err.object[err.start:err.end]
        if all(0xDC80 <= ord(c) <= 0xDCFF for c in chunk):
            return bytes(ord(c) - 0xDC00 for c in chunk), err.end
        return codecs.backslashreplace_errors(err)
    raise err


codecs.register_error("lvmae_names", _name_bytes_else_escaped)


@contextlib.contextmanager
def names_printable():
    """stdout and stderr print any path: a name that is not UTF-8 turned a finished job's last print
    into an exit 1 under a strict UTF-8 stdout. The streams' own settings come back after (main() may be
    called from a Python program)."""
    changed = []
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):   # a replaced stream (pytest's, a StringIO)
            before = stream.errors
            stream.reconfigure(errors="lvmae_names")
            changed.append((stream, before))
    try:
        yield
    finally:
        for stream, before in changed:
            with contextlib.suppress(AttributeError, ValueError):
                stream.reconfigure(errors=before)


def _run(parser, args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # -v: our debug lines only (the root at DEBUG printed matplotlib's font search, line by line); NOTSET
    # otherwise, so a later main() in the same process without -v is not left at DEBUG.
    logging.getLogger("lvmae_fast").setLevel(logging.DEBUG if args.verbose else logging.NOTSET)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)  # a usage error (exit 2), as argparse's own: nothing on stdout for a pipe
        return 2
    command = " ".join(filter(None, (args.command, getattr(args, "store_command", None))))

    def interrupted() -> int:
        # Ctrl-C: what was written is consistent (atomic writes, committed videos, saved windows): no traceback.
        hint = INTERRUPTED_HINTS.get(args.command)
        print(f"lvmae {command}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return interrupted()
    except BrokenPipeError:
        # `lvmae store info S | head`: the reader has gone, which is no error of ours. Python's recipe: point
        # stdout at /dev/null so the interpreter's final flush does not raise again, and exit quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as err:
        if caused_by_interrupt(err):  # a Ctrl-C a library turned into another error (interrupts.py)
            return interrupted()
        if not isinstance(err, (ValueError, OSError, MissingDependency)):
            raise
        # Bad input (or a path the system refuses: missing, not writable, disk full) is the user's to
        # fix: one clear line, no traceback. OSError covers FileNotFoundError, PermissionError, ...
        print(f"lvmae {command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
