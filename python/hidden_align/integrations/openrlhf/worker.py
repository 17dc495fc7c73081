"""The patches of :mod:`hidden_align.integrations.openrlhf.trainer`, applied in every process of
an OpenRLHF run as OpenRLHF's modules are imported.

Why an import hook run by Ray's ``worker_process_setup_hook``: OpenRLHF's trainer, its actor
ranks and its experience maker live in Ray actors, separate processes that import OpenRLHF
themselves, so patching the launcher's process alone changes nothing where the work happens.
Ray runs the job's setup hook in every worker process before any task or actor (the launcher
adds it to the ``runtime_env`` that OpenRLHF gives ``ray.init``). The hook installs a finder
on ``sys.meta_path``: OpenRLHF's modules are patched right after they execute, in the
processes that import them (the PPO trainer, the actor ranks). Every worker of the job runs
the hook, so every worker imports ``hidden_align`` (torch and the native library; a few
seconds once), and ``hidden_align`` must be installed on every node.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__all__ = ["SETUP_HOOK", "restore", "setup"]

# What Ray's runtime_env names as the setup hook: "module.function".
SETUP_HOOK = f"{__name__}.setup"


# The module -> its class whose methods trainer.py wraps, and the trainer.py function that
# wraps them. ppo_actor's PolicyLoss is replaced besides (patch_policy_loss).
WRAPPED = {
    "openrlhf.trainer.ray.launcher": ("BaseModelActor", "patch_model_actor"),
    "openrlhf.trainer.ray.ppo_actor": ("ActorPPOTrainer", "patch_actor_trainer"),
    "openrlhf.trainer.ppo_utils.experience_maker": (
        "RemoteExperienceMaker",
        "patch_experience_maker",
    ),
}
_PPO_ACTOR = "openrlhf.trainer.ray.ppo_actor"


def _patch(module) -> None:
    from . import trainer  # imported by the hook only where OpenRLHF is

    class_name, wrap = WRAPPED[module.__name__]
    if module.__name__ == _PPO_ACTOR:
        trainer.patch_policy_loss(module)
    getattr(trainer, wrap)(getattr(module, class_name))


def _restore(module) -> None:
    from . import trainer

    class_name, _ = WRAPPED[module.__name__]
    if module.__name__ == _PPO_ACTOR:
        trainer.unpatch_policy_loss(module)
    trainer.unwrap(getattr(module, class_name))


class _PatchingLoader(importlib.abc.Loader):
    """The module's own loader, then its patch."""

    def __init__(self, loader, patch) -> None:
        self._loader = loader
        self._patch = patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._patch(module)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds OpenRLHF's patched modules through the other finders and wraps their loader."""

    def __init__(self) -> None:
        self._finding = set()

    def find_spec(self, name, path=None, target=None):
        if name not in WRAPPED or name in self._finding:
            return None
        self._finding.add(name)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._finding.discard(name)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchingLoader(spec.loader, _patch)
        return spec


def setup() -> None:
    """Patch OpenRLHF's modules in this process: those already imported now, the others as
    they are imported. Idempotent. Ray calls it in every worker process of the job
    (``runtime_env={"worker_process_setup_hook": SETUP_HOOK}``)."""
    if not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
    for name in WRAPPED:
        module = sys.modules.get(name)
        if module is not None:
            _patch(module)


def restore() -> None:
    """Undo :func:`setup` in this process: the finder removed, OpenRLHF's own methods and
    ``PolicyLoss`` put back in the modules already imported."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PatchOnImport)]
    for name in WRAPPED:
        module = sys.modules.get(name)
        if module is not None:
            _restore(module)
