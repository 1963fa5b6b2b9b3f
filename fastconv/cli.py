"""The `fastconv` command."""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

import fastconv
from fastconv import dispatch, train


def info(args):
    """Versions, backends and their algorithms (and why one is unavailable), auto, threads and BLAS."""
    from fastconv import _sysinfo, autotune

    status = fastconv.backend_status()  # loads the backends first: describe() then sees their libraries
    machine = _sysinfo.describe()
    print(", ".join(f"{name} {version}" for name, version in dict(machine["versions"], torch=machine["torch"]).items()
                    if version))
    print(f"machine: {machine['cpu']}, {machine['physical_cores'] or '?'} cores ({machine['usable_cpus']} usable), "
          f"{machine['platform']}; threads in use: {fastconv.get_num_threads()}")
    print(f"default backend: {fastconv.get_backend()}")
    if autotune.measuring():
        print(f"auto: the fastest algorithm, measured once per call shape; {len(autotune.remembered())} choices "
              f"remembered in {autotune.cache_path()} (FASTCONV_AUTO=fixed: the fixed order)")
    else:
        print(f"auto: the fixed order {', '.join(dispatch.PREFERENCE)}, each backend's algorithms in its default "
              f"order (FASTCONV_AUTO=fixed)")
    for name, error in status.items():
        if error is not None:
            print(f"  {name:8s} unavailable: {error}")
            continue
        describe = getattr(dispatch.load(name), "describe", None)
        print(f"  {name:8s} available{': ' + describe() if describe else ''}")
        for algorithm in (a for a in fastconv.algorithms() if a.split(":")[0] == name):
            print(f"    {algorithm:18s} {', '.join(dispatch.get_algorithm(algorithm).ops)}")
    for pool in machine["thread_pools"]:
        print(f"  {pool}")
    print(f"  Numba threading layer: {machine['numba_threading_layer'] or 'Numba not loaded'}")
    variables = machine["kernel_variables"]
    print("  variables forcing a kernel: " + (", ".join(f"{k}={v}" for k, v in variables.items()) or "none"))


def tune(args):
    """Measure auto's choices again, whatever is remembered: for the suite's shapes, or for every call a
    script makes (`--script FILE` or `--module NAME`, run as python runs them)."""
    import runpy

    from fastconv import autotune, suite

    if not autotune.measuring():
        sys.exit("fastconv tune: FASTCONV_AUTO=fixed turns measuring off; unset it to tune")
    with fastconv.threads(args.threads or fastconv.get_num_threads()), autotune.remeasuring():
        dispatch.forget_choices()
        if args.script or args.module:
            sys.argv = [args.script or args.module, *args.script_args]
            if args.script:
                runpy.run_path(args.script, run_name="__main__")
            else:
                runpy.run_module(args.module, run_name="__main__", alter_sys=True)
        else:
            convs, pools = suite.cases(quick=False)
            for case in convs + pools:
                dtypes = (np.float32, np.float64) if case == suite.FLOAT64_CASE else (np.float32,)
                for dtype in dtypes:
                    inputs = suite.make_inputs(case, dtype)
                    for op in case.ops:
                        choice = suite.fastconv_explain(case, op, inputs)
                        print(f"{case.name:32s} {np.dtype(dtype).name} {choice}")
        dispatch.forget_choices()
    print(f"choices saved in {autotune.cache_path()}")


def cache(args):
    """Show or clear auto's remembered choices (every fingerprint's file in the cache directory)."""
    from fastconv import autotune

    if args.action == "clear":
        files = autotune.cache_files()
        autotune.forget()
        dispatch.forget_choices()
        print(f"removed {len(files)} file(s) from {autotune.cache_dir()}")
        return
    current = autotune.cache_path()
    files = autotune.cache_files()
    print(f"cache directory: {autotune.cache_dir()} ({len(files)} file(s); this machine's: {current.name})")
    for path in files:
        try:
            stored = json.loads(path.read_text())
            choices, print_ = stored["choices"], stored["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            print(f"{path.name}: unreadable ({error})")
            continue
        blas = ", ".join(f"{lib.get('internal_api')} {lib.get('version')} {lib.get('architecture')}"
                         for lib in print_.get("blas", []))
        mark = " (this machine, now)" if path == current else ""
        print(f"{path.name}{mark}: {len(choices)} choices; {print_.get('cpu')}; BLAS {blas}; "
              f"variables {print_.get('kernel_variables') or 'none'}")
        if path == current or args.all:
            for key, name in sorted(choices.items()):
                print(f"  {name:18s} {key}")


def restart_for_measuring(argv, reuse_buffers=True, keep_blas_kernel=False):
    """Restart this process as `python -m fastconv ARGV` with BLAS_THREAD_TIMEOUT in the environment, without
    FORCED_BLAS_KERNEL (unless keep_blas_kernel) and, with reuse_buffers, REUSED_BUFFERS in GLIBC_TUNABLES,
    unless that is so already (glibc and OpenBLAS read them only when they start). A value the user set for
    the timeout is kept."""
    from fastconv.report.measure import BLAS_THREAD_TIMEOUT, FORCED_BLAS_KERNEL, REUSED_BUFFERS, reusing_buffers

    name, value = BLAS_THREAD_TIMEOUT
    env = dict(os.environ)
    env.setdefault(name, value)
    if not keep_blas_kernel:
        for variable in FORCED_BLAS_KERNEL:
            env.pop(variable, None)
    if reuse_buffers and not reusing_buffers():
        current = env.get("GLIBC_TUNABLES")
        env["GLIBC_TUNABLES"] = f"{current}:{REUSED_BUFFERS}" if current else REUSED_BUFFERS
    if env == dict(os.environ):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "fastconv", *argv], env)


def report(args):
    """Time auto, every available algorithm and PyTorch over the benchmark suite; write an HTML/Markdown
    report (or, with --from, render the report of an earlier run's results.json again)."""
    from fastconv import report

    if args.from_results:
        report.from_results(args.from_results, args.out)
        return
    restart_for_measuring(args.argv, reuse_buffers=not args.default_allocator, keep_blas_kernel=args.keep_blas_kernel)
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
    report_parser.add_argument("--keep-blas-kernel", action="store_true",
                               help="keep OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE as set (by default the report "
                                    "unsets them and OpenBLAS picks its own kernel)")
    report_parser.add_argument("--from", dest="from_results", metavar="RESULTS_JSON",
                               help="render the report of this results.json again, without measuring")
    report_parser.set_defaults(run=report)
    tune_parser = commands.add_parser("tune", help=tune.__doc__, description=tune.__doc__)
    source = tune_parser.add_mutually_exclusive_group()
    source.add_argument("--script", help="a Python file to run; every call it makes is measured")
    source.add_argument("--module", help="a module to run as `python -m MODULE`")
    tune_parser.add_argument("--threads", type=int, help="the thread count to tune for (default: fastconv's)")
    tune_parser.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script or module")
    tune_parser.set_defaults(run=tune)
    cache_parser = commands.add_parser("cache", help=cache.__doc__, description=cache.__doc__)
    cache_parser.add_argument("action", choices=("show", "clear"))
    cache_parser.add_argument("--all", action="store_true",
                              help="list the choices of every file, not only this machine's")
    cache_parser.set_defaults(run=cache)
    train.add_parser(commands)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # to restart the same command
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
