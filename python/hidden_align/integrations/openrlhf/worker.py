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


def _patch_launcher(module) -> None:
    from .trainer import patch_model_actor

    patch_model_actor(module.BaseModelActor)


def _patch_ppo_actor(module) -> None:
    from .trainer import patch_actor_trainer, patch_policy_loss

    patch_policy_loss(module)
    patch_actor_trainer(module.ActorPPOTrainer)


def _patch_experience_maker(module) -> None:
    from .trainer import patch_experience_maker

    patch_experience_maker(module.RemoteExperienceMaker)


def _restore_launcher(module) -> None:
    from .trainer import unwrap

    unwrap(module.BaseModelActor)


def _restore_ppo_actor(module) -> None:
    from .trainer import unpatch_policy_loss, unwrap

    unpatch_policy_loss(module)
    unwrap(module.ActorPPOTrainer)


def _restore_experience_maker(module) -> None:
    from .trainer import unwrap

    unwrap(module.RemoteExperienceMaker)


RESTORES = {
    "openrlhf.trainer.ray.launcher": _restore_launcher,
    "openrlhf.trainer.ray.ppo_actor": _restore_ppo_actor,
    "openrlhf.trainer.ppo_utils.experience_maker": _restore_experience_maker,
}

PATCHES = {
    "openrlhf.trainer.ray.launcher": _patch_launcher,
    "openrlhf.trainer.ray.ppo_actor": _patch_ppo_actor,
    "openrlhf.trainer.ppo_utils.experience_maker": _patch_experience_maker,
}


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
        patch = PATCHES.get(name)
        if patch is None or name in self._finding:
            return None
        self._finding.add(name)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._finding.discard(name)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchingLoader(spec.loader, patch)
        return spec


def setup() -> None:
    """Patch OpenRLHF's modules in this process: those already imported now, the others as
    they are imported. Idempotent. Ray calls it in every worker process of the job
    (``runtime_env={"worker_process_setup_hook": SETUP_HOOK}``)."""
    if not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
    for name, patch in PATCHES.items():
        module = sys.modules.get(name)
        if module is not None:
            patch(module)


def restore() -> None:
    """Undo :func:`setup` in this process: the finder removed, OpenRLHF's own methods and
    ``PolicyLoss`` put back in the modules already imported."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PatchOnImport)]
    for name, undo in RESTORES.items():
        module = sys.modules.get(name)
        if module is not None:
            undo(module)
