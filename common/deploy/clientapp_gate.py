"""Flower's ``flwr-clientapp``, run only for an app (FAB) the site approved.

With the SuperNode's default process isolation, Flower starts every ClientApp task as the
command ``flwr-clientapp``, looked up on ``PATH``. A site kit's ``start-supernode.sh`` puts the
kit's ``bin/`` first on ``PATH``; its ``flwr-clientapp`` runs ``fedtransfer site clientapp``,
which is :func:`run_gated_clientapp`: Flower's own entry point, with one step checked.

The seam is ``install_from_fab`` in :mod:`flwr.supernode.runtime.run_clientapp`. That process
pulls the message, context, run and FAB from the SuperNode and installs the FAB before it
imports any app code: nothing of the app runs, and no site data is read, before that call.
Our replacement hashes the FAB's bytes and raises :class:`AppNotApproved` unless the site's
signed list names it; Flower turns the exception into an error reply to the ServerApp that
carries its one-line message, and we log the same line. An approved FAB is installed and run
by Flower unchanged.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.data.site_config import SiteConfig
from common.deploy.approved_apps import SHORT_HASH, AppNotApproved, ApprovedApps, check_approved, load_site_approvals
from common.errors import DeploymentError, FedtransferError

logger = logging.getLogger(__name__)

#: Top-level packages of this project. The approved app brings its own copy of them; the gate's
#: copies are forgotten before Flower imports the app, so the app runs its own code only.
PROJECT_PACKAGES = ("common", "client", "server", "simulations")
#: The function of :mod:`flwr.supernode.runtime.run_clientapp` that installs the run's FAB.
SEAM = "install_from_fab"


def gated_install(
    install: Callable[..., Path], approvals: ApprovedApps | FedtransferError, site_config: Path
) -> Callable[..., Path]:
    """``install`` (Flower's ``install_from_fab``), refusing any FAB that ``approvals`` does not list.

    ``approvals`` is the error met while loading them when the list cannot be used: then every FAB
    is refused, with that error as the reason.
    """

    def install_if_approved(fab: bytes, *args: Any, **kwargs: Any) -> Path:
        try:
            fab_hash = check_approved(fab, approvals, site_config)
        except AppNotApproved as refusal:
            logger.error("%s", refusal)
            raise
        logger.info("app FAB sha256 %s is approved by this site; installing it", fab_hash[:SHORT_HASH])
        return install(fab, *args, **kwargs)

    return install_if_approved


def _load_approvals(site_config: Path) -> ApprovedApps | FedtransferError:
    try:
        return load_site_approvals(SiteConfig.load(site_config))
    except FedtransferError as err:
        return err


def _log_plainly() -> None:
    """The gate's lines plainly on standard error (the SuperNode's log); the rest logs as in Flower's own process."""
    logging.getLogger().handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s fedtransfer: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _forget_project_modules() -> None:
    for name in [m for m in sys.modules if m.split(".", 1)[0] in PROJECT_PACKAGES]:
        del sys.modules[name]


def run_gated_clientapp(site_config: Path, flower_args: list[str]) -> None:
    """Run Flower's ``flwr-clientapp`` with ``flower_args``, installing only FABs the site approved."""
    import flwr.supernode.runtime.run_clientapp as runtime
    from flwr.supernode.cli import flwr_clientapp

    _log_plainly()
    if not callable(getattr(runtime, SEAM, None)):
        raise DeploymentError(
            f"this Flower's flwr-clientapp has no {SEAM} to check apps at; refusing to run any app unchecked "
            "(fedtransfer supports Flower 1.42)"
        )
    runtime.install_from_fab = gated_install(runtime.install_from_fab, _load_approvals(site_config), site_config)
    _forget_project_modules()
    sys.argv = ["flwr-clientapp", *flower_args]
    flwr_clientapp()
