"""How every `lladav-*` command fails: one line for a fault the user can fix, a traceback for a bug.

- An expected failure (a bad setting, a missing or existing file, bad data, a checkpoint that
  does not restore: `EXPECTED` and our own error classes) prints `PROG: error: MESSAGE` to
  stderr (a message of several lines keeps them, indented; our RuntimeError classes keep
  their name in front: `NonFiniteLossError: ...`) and exits 1.
- A usage error (a flag argparse or absl cannot parse, a required flag missing, an unknown
  config key) exits 2, as argparse does.
- Ctrl-C exits 130 with one line.
- Anything else is a bug: its traceback stays, followed by a line saying what to report.
- `--debug` on any command, or LLADAV_DEBUG=1, prints the full traceback of every failure.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging as pylogging
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

DEBUG_ENV = "LLADAV_DEBUG"
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

# Failures a user can act on. Our ValueError subclasses (ConfigError, ModelDirError, MeshError,
# TopologyError, SafetensorsError, WeightMappingError, ConversionError, ImageLoadError) are in.
EXPECTED: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
    PermissionError,
)
# Our RuntimeError subclasses, looked up only where their module is already loaded: an instance
# cannot exist otherwise, and the handler must not import Orbax or Grain to find out.
_OWN_RUNTIME_ERRORS = (
    ("lladav_jax.train.checkpoint", "CheckpointError"),
    ("lladav_jax.train.checkpoint", "NonFiniteStateError"),
    ("lladav_jax.train.workdir_lock", "WorkdirBusyError"),
    ("lladav_jax.train.bookkeeping", "NonFiniteLossError"),
    ("lladav_jax.data.pipeline", "DataQualityError"),
)
# Log lines a user cannot act on: Orbax warns that a checkpoint's metadata file is missing
# whenever it looks at a fresh or half-written step, which is the normal case.
QUIET_LOG_PREFIXES = ("Metadata file does not exist",)


class UsageError(Exception):
    """A command line that does not parse (exit 2), for the absl commands."""


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """--debug among the arguments (absl's --debug=true too), or LLADAV_DEBUG=1."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    args = sys.argv[1:] if argv is None else argv
    return any(a in ("--debug", "--debug=true", "--debug=True", "--debug=1") for a in args)


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace,
                     names: Sequence[str]) -> None:
    """A usage error (exit 2) naming the first of the integer flags `names` below 1; flags a
    subcommand does not have are passed over."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name}={value}: must be >= 1")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """--debug on an argparse parser (and each of its subcommands). `run` reads it from argv,
    so the value parsed here is never needed; SUPPRESS keeps subparsers from resetting it."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for p in [parser, *(q for s in subparsers for q in s.choices.values())]:
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help=f"show the full traceback of an error (also {DEBUG_ENV}=1)")


def is_expected(exc: BaseException) -> bool:
    """Whether `exc` is a failure the user can act on (a one-line error), not a bug."""
    if isinstance(exc, EXPECTED):
        return True
    for module, name in _OWN_RUNTIME_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


def error_text(prog: str, message: str) -> str:
    """`PROG: error: first line`, further lines indented under it."""
    lines = [line.rstrip() for line in str(message).strip().splitlines() if line.strip()]
    first = lines[0] if lines else "(no message)"
    return "\n".join([f"{prog}: error: {first}", *(f"  {line.strip()}" for line in lines[1:])])


def _message(exc: BaseException) -> str:
    text = str(exc)
    return text if text.strip() else type(exc).__name__


def run(prog: str, body: Callable[[], int | None], argv: Sequence[str] | None = None,
        *, interrupted: str = "interrupted") -> int:
    """Runs a command's body; returns its exit status (argparse's SystemExit passes through)."""
    debug = debug_requested(argv)
    quiet_logs()
    try:
        return body() or 0
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as e:
        if debug:
            traceback.print_exc()
        print(error_text(prog, _message(e)), file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        if is_expected(e):
            if debug:
                traceback.print_exc()
            # Our run-state errors keep their class name (NonFiniteLossError: ...): it says
            # what stopped the run, and logs are searched for it.
            kind = "" if isinstance(e, EXPECTED) else f"{type(e).__name__}: "
            print(error_text(prog, kind + _message(e)), file=sys.stderr)
            return EXIT_ERROR
        traceback.print_exc()  # a bug: what it is and where stays visible
        print(f"{prog}: internal error ({type(e).__name__}): this is a bug, not a setting. "
              "Please report it with the traceback above, the command line and "
              "`pip show lladav-jax`.", file=sys.stderr)
        return EXIT_ERROR


class _QuietFilter(pylogging.Filter):
    def filter(self, record: pylogging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record is not ours to drop
            return True
        return not text.startswith(QUIET_LOG_PREFIXES)


_QUIET = _QuietFilter()


def quiet_logs() -> None:
    """Drops the absl log lines of QUIET_LOG_PREFIXES (Orbax logs through absl's logger);
    every other warning still shows."""
    logger = pylogging.getLogger("absl")
    if _QUIET not in logger.filters:
        logger.addFilter(_QUIET)


# -- absl commands (lladav-train, lladav-plan) ---------------------------------------------------


def flat_keys(config: Any, prefix: str = "") -> list[str]:
    """Every key path of a ConfigDict (inner nodes too): `train`, `train.steps`, ..."""
    keys = []
    for name, value in config.items():
        path = f"{prefix}{name}"
        keys.append(path)
        if hasattr(value, "items") and hasattr(value, "keys"):
            keys.extend(flat_keys(value, f"{path}."))
    return keys


def unknown_key_message(key: str, known: Sequence[str]) -> str:
    """`unknown config key KEY; did you mean NEAREST?`: difflib over the names beside it, then
    over every key (a key under the wrong section); else what its section holds."""
    parent, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
    close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
    if close:
        return f"unknown config key {key}; did you mean {siblings[close[0]]}?"
    moved = [k for k in known if k.rpartition(".")[2] == leaf]
    close = moved[:1] or difflib.get_close_matches(key, known, n=1, cutoff=0.8)
    if close:
        return f"unknown config key {key}; did you mean {close[0]}?"
    where = f"{parent} has" if parent else "the config has"
    return f"unknown config key {key}; {where} {', '.join(sorted(siblings))}"


def _overrides(argv: Sequence[str], name: str) -> list[str]:
    """The config keys `--NAME.KEY=...` of argv (absl's --noNAME.KEY too)."""
    pattern = re.compile(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)")
    return [m.group(1) for a in argv if (m := pattern.match(a))]


def _config_file(argv: Sequence[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if re.match(rf"^--?{re.escape(name)}=", a):
            return a.split("=", 1)[1]
        if re.match(rf"^--?{re.escape(name)}$", a) and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _diagnose(flag_values: Any, argv: Sequence[str], config_flag: str,
              error: BaseException) -> str:
    """A readable message for a failed absl parse: an unknown config key named with its
    nearest known one; a config file that does not load named with the reason."""
    path = _config_file(argv, config_flag)
    keys = _overrides(argv, config_flag)
    if path is not None:
        try:  # a file that does not load gives a stand-in config that raises when read
            known = flat_keys(flag_values[config_flag].parser.parse(path))
        except Exception as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            return f"--{config_flag} {path} does not load: {lines[-1] if lines else e}"
        for key in keys:
            if key not in known:
                return unknown_key_message(key, known)
    elif keys:
        return f"--{config_flag}.{keys[0]} needs --{config_flag} (a config file) before it"
    text = str(error).strip()
    if text.startswith("flag --"):  # IllegalFlagValueError: "flag --x=v: why"
        return text[len("flag "):]
    return text or type(error).__name__


@contextlib.contextmanager
def _argv_as(argv: Sequence[str]) -> Iterator[None]:
    # ml_collections reads the config overrides from sys.argv, not from the argv it is given.
    saved = sys.argv
    sys.argv = list(argv)
    try:
        yield
    finally:
        sys.argv = saved


def parse_absl_flags(argv: Sequence[str], *, required: Sequence[str],
                     config_flag: str = "config") -> list[str]:
    """Parses absl's global FLAGS from argv (argv[0]: the program), as `app.run` would, but
    with failures as UsageErrors carrying one readable message. May be called again in the
    same process (tests): values are reset and the config's override flags defined anew."""
    from absl import app, flags

    fv = flags.FLAGS
    app.define_help_flags()
    fv.unparse_flags()
    for name in [n for n in fv if n.startswith(f"{config_flag}.")]:
        delattr(fv, name)  # defined by the previous parse of the config file
    try:
        with _argv_as(argv):
            rest = fv(list(argv))
    except Exception as e:  # flags.Error, or ml_collections' AttributeError for a bad key
        raise UsageError(_diagnose(fv, argv, config_flag, e)) from e
    for name in required:
        if fv[name].value is None:
            raise UsageError(f"--{name} is required")
    if config_flag in fv and fv[config_flag].value is not None:
        try:  # a config file that does not load parses as a stand-in that raises when read
            fv[config_flag].value.keys()
        except Exception as e:
            raise UsageError(_diagnose(fv, argv, config_flag, e)) from e
    return rest


def define_absl_debug_flag() -> None:
    """--debug for an absl command (defined once, whichever command's module comes first)."""
    from absl import flags

    if "debug" not in flags.FLAGS:
        flags.DEFINE_boolean("debug", False,
                             f"show the full traceback of an error (also {DEBUG_ENV}=1)")


def run_absl(prog: str, body: Callable[[list[str]], int | None], argv: Sequence[str] | None,
             *, required: Sequence[str], interrupted: str = "interrupted") -> int:
    """`run` for a command whose flags are absl's (with an ml_collections config flag)."""
    from absl import logging

    argv = list(sys.argv if argv is None else argv)

    def go() -> int | None:
        rest = parse_absl_flags(argv, required=required)
        logging.use_absl_handler()  # what app.run does: absl's own log format on stderr
        return body(rest)

    return run(prog, go, argv[1:], interrupted=interrupted)
