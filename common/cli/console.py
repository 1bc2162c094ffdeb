"""The CLI's rich console (terminal output belongs to the CLI only, never to library code)."""

from rich.console import Console

console = Console()
