"""Which OpenRLHF is installed, and which of our ``PolicyLoss`` classes speaks its API.

Read from the distribution's metadata, without importing OpenRLHF (its model package imports
flash-attn, which needs a GPU machine).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import warnings

from .policy_loss import PolicyLossV0111, PolicyLossV0112

__all__ = [
    "ALLOW_UNTESTED",
    "SUPPORTED_OPENRLHF_VERSIONS",
    "installed_openrlhf_version",
    "policy_loss_class",
]

SUPPORTED_OPENRLHF_VERSIONS = ("0.11.1", "0.11.2")
ALLOW_UNTESTED = "HIDDEN_ALIGN_ALLOW_UNTESTED_OPENRLHF"


def installed_openrlhf_version() -> str | None:
    """The installed OpenRLHF's version, or None when it is not installed."""
    try:
        return importlib.metadata.version("openrlhf")
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def policy_loss_class(version: str | None = None):
    """The ``PolicyLoss`` class for OpenRLHF ``version`` (default: the installed one; the
    current release's, 0.11.2, when none is installed).

    Raises:
        ImportError: for a version outside :data:`SUPPORTED_OPENRLHF_VERSIONS`, unless
            ``HIDDEN_ALIGN_ALLOW_UNTESTED_OPENRLHF=1`` (then it warns and follows 0.11.1's API
            before 0.11.2, 0.11.2's from it on).
    """
    if version is None:
        version = installed_openrlhf_version()
    if version is None or version == "0.11.2":
        return PolicyLossV0112
    if version == "0.11.1":
        return PolicyLossV0111
    if os.environ.get(ALLOW_UNTESTED, "") != "1":
        raise ImportError(
            f"hidden_align.integrations.openrlhf supports OpenRLHF "
            f"{' and '.join(SUPPORTED_OPENRLHF_VERSIONS)}; this is OpenRLHF {version}. Install "
            f"one of them (pip install --no-deps openrlhf==0.11.2) or set {ALLOW_UNTESTED}=1 to "
            "use it anyway"
        )
    cls = PolicyLossV0111 if _release(version) < (0, 11, 2) else PolicyLossV0112
    warnings.warn(
        f"hidden_align: OpenRLHF {version} is untested; following the API of "
        f"{cls.OPENRLHF_VERSION}",
        stacklevel=3,
    )
    return cls
