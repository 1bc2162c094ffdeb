"""The CLI's rich consoles (terminal output belongs to the CLI only, never to library code).

Results (tables, verdicts, JSON) go to standard output; logs, warnings and progress go to
standard error, so ``--json`` output and redirected results stay clean.
"""

from rich.console import Console

console = Console()
log_console = Console(stderr=True)
