"""The CLI's rich consoles (terminal output belongs to the CLI only, never to library code).

Results (tables, verdicts, JSON) go to standard output; logs, warnings, errors and progress go
to standard error, so ``--json`` output and redirected results stay clean.
"""

from rich.console import Console
from rich.text import Text

from common.errors import FedtransferError

console = Console()
log_console = Console(stderr=True)


def say(text: str) -> None:
    """A message to the operator on standard error, taken literally (no markup), never wrapped."""
    log_console.print(Text(text), soft_wrap=True)


def error_line(kind: str, message: str) -> None:
    """An error in one line on standard error: ``error (KIND): MESSAGE``."""
    log_console.print(
        Text.assemble(("error", "bold red"), f" ({kind}): {message}" if kind else f": {message}"), soft_wrap=True
    )


def print_error(err: FedtransferError) -> None:
    """An error we raised on purpose: one line on standard error, no traceback."""
    error_line(type(err).__name__, str(err))
