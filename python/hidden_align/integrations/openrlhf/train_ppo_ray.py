"""OpenRLHF's ``openrlhf.cli.train_ppo_ray`` with the alignment term, OpenRLHF unmodified::

    python -m hidden_align.integrations.openrlhf.train_ppo_ray <OpenRLHF's own arguments> \\
        --align.coef 0.1 --align.markers 'Answer:' '\\boxed{'

The ``--align.*`` options (:class:`~hidden_align.integrations.openrlhf.settings.Settings`) are
taken out of the command line; the rest goes to OpenRLHF's own parser and ``train``, run as
``__main__`` exactly as ``python -m openrlhf.cli.train_ppo_ray`` runs them. Before that, the
launcher

* exports the settings as ``HIDDEN_ALIGN_*`` variables,
* wraps ``ray.init`` so that the ``runtime_env`` OpenRLHF passes it also carries those
  variables and Ray's ``worker_process_setup_hook``
  (:func:`hidden_align.integrations.openrlhf.worker.setup`), which patches OpenRLHF's classes
  in every Ray worker as they are imported,
* and patches this process too.

``--help`` prints these options, then OpenRLHF's.

Under ``ray job submit``, make this launcher the job's entrypoint (its ``ray.init`` adds the
hook and the variables to the job's runtime environment; do not give them to the job too: Ray
refuses a key given twice). ``hidden_align`` must be installed on every node.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

from .settings import Settings
from .versions import ALLOW_UNTESTED
from .worker import SETUP_HOOK, setup

__all__ = ["main", "runtime_env"]

OPENRLHF_MAIN = "openrlhf.cli.train_ppo_ray"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hidden_align.integrations.openrlhf.train_ppo_ray",
        add_help=False,
        description="OpenRLHF's train_ppo_ray with the Hidden-Align term. These options, then "
        "OpenRLHF's own:",
    )
    Settings.add_arguments(parser)
    return parser


def runtime_env(settings: Settings, base: dict | None = None) -> dict:
    """``base`` (a Ray ``runtime_env``) plus the settings' variables and the setup hook.

    Raises:
        RuntimeError: ``base`` already names another setup hook (Ray runs one per job).
    """
    env = dict(base or {})
    hook = env.get("worker_process_setup_hook")
    if hook not in (None, SETUP_HOOK):
        raise RuntimeError(
            f"hidden_align: the Ray runtime_env already has worker_process_setup_hook={hook!r}; "
            f"Ray runs one per job: call {SETUP_HOOK}() from it"
        )
    env["worker_process_setup_hook"] = SETUP_HOOK
    variables = settings.to_env()
    if ALLOW_UNTESTED in os.environ:  # the workers check the OpenRLHF version too
        variables[ALLOW_UNTESTED] = os.environ[ALLOW_UNTESTED]
    env["env_vars"] = {**dict(env.get("env_vars") or {}), **variables}
    return env


def _wrap_ray_init(settings: Settings) -> None:
    import ray

    original = ray.init
    if getattr(original, "_hidden_align", False):
        return

    def init(*args, **kwargs):
        kwargs["runtime_env"] = runtime_env(settings, kwargs.get("runtime_env"))
        return original(*args, **kwargs)

    init._hidden_align = True
    ray.init = init


def main(argv: list | None = None) -> None:
    """Parse the ``--align.*`` options out of ``argv`` (default ``sys.argv[1:]``), prepare
    this process and Ray's workers, and run OpenRLHF's ``train_ppo_ray`` on the rest."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    namespace, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(parser.format_help())
    try:
        settings = Settings.from_arguments(namespace)
    except ValueError as exc:
        parser.error(str(exc))
    os.environ.update(settings.to_env())
    _wrap_ray_init(settings)
    setup()
    sys.argv = [OPENRLHF_MAIN, *rest]
    runpy.run_module(OPENRLHF_MAIN, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
