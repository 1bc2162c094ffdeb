"""The progress display of ``fedtransfer simulate``: one line per task (start-up, pretraining, rounds, baselines).

It draws on standard error, and only when that is a terminal (and not with ``-v``, whose raw
library logs would tear it); otherwise it stays silent and the log lines say the same.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from common.progress import BASELINES, PRETRAINING, ROUNDS, STARTUP

LABELS = {STARTUP: "starting", PRETRAINING: "pretraining", ROUNDS: "rounds", BASELINES: "baselines"}
FIRST_WAIT = "training: 0 of"


class RunProgress:
    """Tasks appear as the run reports them; a new task finishes the one before."""

    def __init__(self, console: Console, enabled: bool) -> None:
        self.display = Progress(
            SpinnerColumn(finished_text="[green]✓[/green]"),
            TextColumn("{task.description:<11}"),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[count]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[detail]}"),
            console=console,
            disable=not enabled,
            transient=True,
        )
        self.tasks: dict[str, TaskID] = {}
        self.current: str | None = None

    def __enter__(self) -> RunProgress:
        self.display.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.display.stop()

    def begin(self, task: str, detail: str = "") -> None:
        """Show ``task`` as the current one (before the run reports anything, say)."""
        self.update({"task": task, "detail": detail})

    def update(self, progress: dict[str, Any]) -> None:
        """Apply one progress report (a :class:`common.progress.Progress` as a dict)."""
        task = progress["task"]
        if task != self.current:
            self._finish_current()
            if task in self.tasks:
                self.display.reset(self.tasks[task], total=None, completed=0, start=True)
            else:
                self.tasks[task] = self.display.add_task(LABELS.get(task, task), total=None, count="", detail="")
            self.current = task
        task_id = self.tasks[task]
        changes: dict[str, Any] = {}
        if progress.get("total") is not None:
            changes["total"] = progress["total"]
        if progress.get("completed") is not None:
            changes["completed"] = progress["completed"]
        self.display.update(task_id, **changes)
        shown = self.display.tasks[self.display.task_ids.index(task_id)]
        count = f"{shown.completed:g}/{shown.total:g}" if shown.total is not None else ""
        detail = progress.get("detail") or ("" if progress.get("completed") is None else shown.fields["detail"])
        if task == ROUNDS and shown.total is not None and detail and progress.get("transient"):
            detail = f"round {shown.completed + 1:g}: {detail}"
            if shown.completed == 0 and progress["detail"].startswith(FIRST_WAIT):
                detail += " (each site starts, then calibrates its noise for the whole run)"
        self.display.update(task_id, count=count, detail=detail)
        if progress.get("finished"):
            self._finish_current()

    def note(self, text: str) -> None:
        """Replace the current task's detail (a stop was requested, say)."""
        if self.current is not None:
            self.display.update(self.tasks[self.current], detail=text)

    def _finish_current(self) -> None:
        if self.current is None:
            return
        task_id = self.tasks[self.current]
        shown = self.display.tasks[self.display.task_ids.index(task_id)]
        count = f"{shown.completed:g}/{shown.total:g}" if shown.total is not None else ""
        self.display.update(task_id, total=shown.total or 1, completed=shown.total or 1, count=count, detail="")
        self.display.stop_task(task_id)
        self.current = None
