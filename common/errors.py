"""Every error fedtransfer raises on purpose belongs to one family, and each family has one exit status.

The message of each error tells an operator what to fix; the CLI prints it in one line,
without a traceback, and exits with the family's status.

| family | exit status | about |
|---|---|---|
| :class:`ConfigurationError` | 2 | settings, scenario files, site configuration, checkpoints, command-line use |
| :class:`DataError` | 3 | a site's data files, downloads, malformed documents |
| :class:`PrivacyError` | 4 | privacy policies, ledgers, budgets, accounting, the egress rule |
| :class:`SecurityError` | 5 | keys, manifests, envelopes, signed reports and instructions |
| :class:`DeploymentError` | 6 | provisioning, runs that stop or fail, sites that cannot answer |
"""

from __future__ import annotations


class FedtransferError(Exception):
    """The root of every error fedtransfer raises on purpose."""

    exit_status = 1


class ConfigurationError(FedtransferError):
    """Settings, a scenario, a site configuration, a checkpoint or an argument cannot be used as given."""

    exit_status = 2


class DataError(FedtransferError):
    """A data file or document cannot be used; the message names the file and the fix."""

    exit_status = 3


class PrivacyError(FedtransferError):
    """A privacy policy, ledger, budget or accounting problem; nothing was spent or sent that should not be."""

    exit_status = 4


class SecurityError(FedtransferError):
    """A key, manifest, envelope, signature or instruction does not verify or cannot be used."""

    exit_status = 5


class DeploymentError(FedtransferError):
    """Provisioning failed, a run stopped or failed, or a site cannot answer."""

    exit_status = 6
