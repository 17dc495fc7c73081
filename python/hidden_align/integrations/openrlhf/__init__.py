"""OpenRLHF 0.11.1 and 0.11.2: the fused policy loss, and the alignment term in an unmodified
OpenRLHF.

* :class:`PolicyLoss` takes the constructor arguments and returns the outputs of the installed
  OpenRLHF's ``openrlhf.models.loss.PolicyLoss`` (:class:`PolicyLossV0111` or
  :class:`PolicyLossV0112`; the current release's, 0.11.2, when OpenRLHF is not installed).
* ``python -m hidden_align.integrations.openrlhf.train_ppo_ray <OpenRLHF's arguments>
  --align.coef 0.1 ...`` runs OpenRLHF's own ``train_ppo_ray`` with the alignment term
  (:mod:`hidden_align.integrations.openrlhf.train_ppo_ray`; the classes it patches:
  :mod:`hidden_align.integrations.openrlhf.trainer`).
* :func:`capture_last_hidden` records a module's output (the backbone's) for one forward.

Versions: importing this package with an OpenRLHF other than those in
:data:`SUPPORTED_OPENRLHF_VERSIONS` installed raises ``ImportError``, unless
``HIDDEN_ALIGN_ALLOW_UNTESTED_OPENRLHF=1`` (then it warns and follows the API of the closest
supported release: 0.11.1's before 0.11.2, 0.11.2's from it on).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import warnings

from .hidden import CapturedHidden, capture_last_hidden
from .policy_loss import PolicyLossV0111, PolicyLossV0112

__all__ = [
    "SUPPORTED_OPENRLHF_VERSIONS",
    "CapturedHidden",
    "PolicyLoss",
    "PolicyLossV0111",
    "PolicyLossV0112",
    "capture_last_hidden",
    "installed_openrlhf_version",
]

SUPPORTED_OPENRLHF_VERSIONS = ("0.11.1", "0.11.2")
ALLOW_UNTESTED = "HIDDEN_ALIGN_ALLOW_UNTESTED_OPENRLHF"


def installed_openrlhf_version() -> str | None:
    """The installed OpenRLHF's version (its distribution metadata, read without importing
    it: its model package needs flash-attn), or None when it is not installed."""
    try:
        return importlib.metadata.version("openrlhf")
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def _policy_loss_class(version: str | None):
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


PolicyLoss = _policy_loss_class(installed_openrlhf_version())
