"""The ``hidden-align`` command (also ``python -m hidden_align``).

Subcommands: ``demo`` (a small end-to-end run, from :mod:`hidden_align.demo`), ``bench`` (every
op against its references on this machine, :mod:`hidden_align.bench`) and ``doctor`` (versions,
backends, CUDA libraries, a kernel compile and a correctness self-check,
:mod:`hidden_align.doctor`). Each subcommand module is imported only when it runs, so that
``--help`` is quick and a broken or missing part does not take the others down.
"""

from __future__ import annotations

import argparse
import sys

PROG = "hidden-align"


def _demo_module():
    """``(module, None)`` or ``(None, why)`` when the demo cannot be imported."""
    try:
        from hidden_align import demo
    except ModuleNotFoundError as e:
        if e.name in ("hidden_align.demo", None):
            return None, "this installation of hidden_align has no demo (hidden_align.demo)"
        return None, f"the demo needs {e.name!r}, which is not installed ({e})"
    except Exception as e:  # an error inside the demo's own imports
        return None, f"importing hidden_align.demo failed: {type(e).__name__}: {e}"
    return demo, None


def _subcommand(argv: list) -> str | None:
    """The subcommand named in ``argv`` (its first positional word), if any."""
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


def build_parser(with_demo: bool = False) -> argparse.ArgumentParser:
    """The argument parser; ``with_demo`` adds the demo's own options (it imports the demo)."""
    from hidden_align import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Hidden-Align alignment loss and DAPO math for PyTorch RL: "
        "a demo, benchmarks and a self-check.",
    )
    parser.add_argument("--version", action="version", version=f"hidden_align {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench,doctor}")
    sub.required = True

    demo_help = "run a small end-to-end example of the alignment loss with DAPO"
    demo_parser = sub.add_parser("demo", help=demo_help, description=demo_help)
    if with_demo:
        module, why = _demo_module()
        if module is not None:
            module.add_arguments(demo_parser)
        else:
            demo_parser.epilog = f"unavailable: {why}"

    from hidden_align.bench import OPS

    bench_help = (
        "time every op against its references (verl's functions when installed, eager PyTorch, "
        "torch.compile) on one device and print one table of medians and ratios"
    )
    bench = sub.add_parser(
        "bench",
        help=bench_help,
        description=bench_help
        + ". Ratio = reference ms / hidden_align ms, from the same interleaved run. Each op's "
        "floor (the bytes it must move) and hidden_align's fraction of the measured bandwidth "
        "(reading on the CPU, copying on a GPU); on a GPU, CUDA events. The header names the "
        "CPU kernels' SIMD level.",
    )
    bench.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda or cuda:N (default: cuda when hidden_align's CUDA backend can run, else "
        "cpu)",
    )
    bench.add_argument(
        "--quick", action="store_true", help="tiny shapes, 3 repetitions, no torch.compile"
    )
    bench.add_argument("--json", action="store_true", help="print the result as JSON")
    bench.add_argument("--reps", type=int, default=None, help="timed repetitions per provider")
    compile_group = bench.add_mutually_exclusive_group()
    compile_group.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="also time torch.compile of the eager formulas (default, except with --quick)",
    )
    compile_group.add_argument(
        "--no-compile", dest="compile", action="store_false", help="do not time torch.compile"
    )
    bench.add_argument(
        "--ops",
        nargs="+",
        choices=OPS,
        default=list(OPS),
        metavar="OP",
        help=f"the ops to time (default: all of {', '.join(OPS)})",
    )

    doctor_help = (
        "versions, backends, CUDA driver and NVRTC, a kernel compile for the GPU and a "
        "correctness self-check of each backend; exits 1 when a check fails"
    )
    doctor = sub.add_parser("doctor", help=doctor_help, description=doctor_help)
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON")
    return parser


def _run_demo(args) -> int:
    module, why = _demo_module()
    if module is None:
        print(f"{PROG} demo: {why}", file=sys.stderr)
        return 2
    return int(module.run(args) or 0)


def _run_bench(args) -> int:
    import json

    from hidden_align import bench

    if args.reps is not None and args.reps < 1:
        print(f"{PROG} bench: --reps must be at least 1", file=sys.stderr)
        return 2
    try:
        result = bench.run_bench(
            device=args.device,
            quick=args.quick,
            reps=args.reps,
            compile=args.compile,
            ops=args.ops,
            log=None if args.json else lambda line: print(f"timing {line}", file=sys.stderr),
        )
    except RuntimeError as e:
        if str(e).startswith("--device"):
            print(f"{PROG} bench: {e}", file=sys.stderr)
            return 2
        raise
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(bench.format_table(result))
    return 0


def _run_doctor(args) -> int:
    from hidden_align import doctor

    return doctor.main(as_json=args.json)


def main(argv: list | None = None) -> int:
    """Entry point of ``hidden-align``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(with_demo=_subcommand(argv) == "demo")
    args = parser.parse_args(argv)
    run = {"demo": _run_demo, "bench": _run_bench, "doctor": _run_doctor}[args.command]
    return run(args)
