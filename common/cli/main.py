"""The ``fedtransfer`` command line: one module per command, wired here.

Only the module of the command asked for is loaded (the others pull in PyTorch, Opacus and
Flower), so the CLI answers at once. An error we raise on purpose is one line on standard
error with its family's exit status; Ctrl-C or SIGTERM ends a command in one line with
status 128 + the signal's number (``simulate`` first stops its run cleanly).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys

from common.errors import ConfigurationError, FedtransferError

FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
#: The command modules under common/cli; each lists the commands it adds in ``COMMANDS``.
MODULES = ("simulate", "app", "simsites", "pretrain", "import_model", "keys", "deploy", "audit", "bench")
OUR_LOGGERS = ("common", "server", "client", "simulations")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2) and ``-v`` accepted before or after any command."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show Flower's and Ray's own logs"
        )

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(ConfigurationError.exit_status, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _setup_logging() -> None:
    from rich.logging import RichHandler

    from common.cli.console import log_console

    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    handler = RichHandler(console=log_console, show_path=False, markup=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


def tune_flower_logging(verbose: bool) -> None:
    """Flower's own console log: INFO with ``-v``, else errors only (fedtransfer reports every round and site)."""
    import flwr.supercore.logger  # noqa: F401  (creates Flower's console handler before we tune it)

    flower = logging.getLogger("flwr")
    flower.propagate = False
    for flower_handler in flower.handlers:
        flower_handler.setLevel(logging.INFO if verbose else logging.ERROR)


def _modules(command: str | None) -> list:
    modules = [importlib.import_module(f"common.cli.{name}") for name in MODULES]
    chosen = [m for m in modules if command in m.COMMANDS]
    return chosen or modules


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of ``command``'s module only."""
    parser = Parser(
        prog="fedtransfer", description="Federated, differentially private transfer learning for hospitals."
    )
    parser.set_defaults(verbose=False)
    commands = parser.add_subparsers(dest="command", required=True)
    for module in _modules(command):
        module.add_commands(commands)
    return parser


def _command(argv: list[str]) -> str | None:
    """The command named in ``argv`` (its first word that is not an option)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


class Signalled(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM arrived."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _signalled(signum: int, frame: object) -> None:
    raise Signalled(signum)


def interrupted_status(signum: int) -> int:
    """The exit status of a command stopped by signal ``signum`` (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + signum


def main(argv: list[str] | None = None) -> int:
    previous = {caught: signal.signal(caught, _signalled) for caught in (signal.SIGINT, signal.SIGTERM)}
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser(_command(argv)).parse_args(argv)
        _setup_logging()
        return args.func(args)
    except FedtransferError as err:
        from common.cli.console import print_error

        print_error(err)
        return err.exit_status
    except KeyboardInterrupt as stop:
        signum = stop.signum if isinstance(stop, Signalled) else signal.SIGINT
        sys.stderr.write(f"fedtransfer: interrupted ({signal.Signals(signum).name})\n")
        return interrupted_status(signum)
    finally:
        for caught, handler in previous.items():
            signal.signal(caught, handler)


if __name__ == "__main__":
    sys.exit(main())
