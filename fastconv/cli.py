"""The `fastconv` command."""
from __future__ import annotations

import argparse
import platform
import sys

import numpy as np

import fastconv
from fastconv import dispatch, train


def info(args):
    """Versions, backends (and why one is unavailable), threads and BLAS."""
    print(f"fastconv {fastconv.__version__}, Python {platform.python_version()}, NumPy {np.__version__}")
    print(f"machine: {platform.machine()}, threads in use: {fastconv.get_num_threads()}")
    print(f"default backend: {fastconv.get_backend()}")
    from fastconv import autotune

    if autotune.measuring():
        print(f"auto: measured once per call shape, {len(autotune.remembered())} choices remembered in "
              f"{autotune.cache_path()} (FASTCONV_AUTO=fixed: the fixed order)")
    else:
        print(f"auto: the fixed order {', '.join(dispatch.PREFERENCE)} (FASTCONV_AUTO=fixed)")
    for name, error in fastconv.backend_status().items():
        if error is None:
            describe = getattr(dispatch.load(name), "describe", None)
            print(f"  {name:8s} available{': ' + describe() if describe else ''}")
        else:
            print(f"  {name:8s} unavailable: {error}")
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return
    for pool in threadpool_info():
        print(f"  {pool['user_api']}: {pool['internal_api']} {pool.get('version')} "
              f"({pool['num_threads']} threads) {pool['filepath']}")


def report(args):
    """Time every available backend and PyTorch over the benchmark suite; write an HTML/Markdown report."""
    from fastconv import report

    report.reexec_for_measuring(args.argv, reuse_buffers=not args.default_allocator)
    report.run(args.out, quick=args.quick, threads=args.threads, with_torch=not args.no_torch,
               command=" ".join(["fastconv", *args.argv]))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastconv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help=info.__doc__).set_defaults(run=info)
    report_parser = commands.add_parser("report", help=report.__doc__, description=report.__doc__)
    report_parser.add_argument("--quick", action="store_true", help="a few cases of the suite (about a minute)")
    report_parser.add_argument("--out", default="fastconv-report", help="report folder (default: %(default)s)")
    report_parser.add_argument("--threads", type=int, help="threads for every side (default: fastconv's setting)")
    report_parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out even if installed")
    report_parser.add_argument("--default-allocator", action="store_true",
                               help="do not restart with freed buffers reused (GLIBC_TUNABLES malloc thresholds)")
    report_parser.set_defaults(run=report)
    train.add_parser(commands)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # to restart the same command
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
