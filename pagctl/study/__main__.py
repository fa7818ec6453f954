"""``python -m pagctl.study``: train, measure and report the digits study (``make study``,
``make study-quick``).

Every refusal is one line, ``error: ...`` naming the option and the fix, with exit status 2
and nothing written: the paths are checked before any work (`pagctl.study.run.out_problem`,
`pagctl.study.report.report_problem`), so a mistyped ``--report`` fails in a second, not
after two hours of training, and never overwrites a file the study did not write.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other refusal of the study."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> _Parser:
    parser = _Parser(
        prog="python -m pagctl.study",
        description="The paper's claims on the embedded digits: a lambda sweep (NN, SBG), "
        "three seeds, four architectures, AutoAttack L2 and Linf at two budgets, alignment; "
        "trains and measures what is missing under --out, then writes the report.")
    parser.add_argument("--out", default="runs/study",
                        help="folder of the study's runs (default runs/study)")
    parser.add_argument("--report", default=None,
                        help="markdown report to write (default OUT/results.md), with its "
                        "figure <stem>-lambda.png beside it; an existing file is replaced only "
                        "when the study wrote it")
    parser.add_argument("--quick", action="store_true",
                        help="the same shape on a tiny budget (2 epochs, a weakened "
                        "AutoAttack on 60 points): tests the pipeline, not the paper")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="train and measure in this many processes of one thread each "
                        "(default 1; 2 on two cores)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # I/N, internal
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the runs as they are; train nothing")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return parser


def _argument_problem(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments, as one line naming the option and the fix;
    None when the study may start. A worker of `run_parallel` writes no report, so only its
    ``--out`` is checked."""
    from pagctl.study.report import figure_path, report_problem
    from pagctl.study.run import out_problem

    if args.jobs < 1:
        return f"--jobs {args.jobs}: give 1 or more processes"
    if args.worker is not None:
        index, _, count = args.worker.partition("/")
        if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
            return f"--worker {args.worker}: expected I/N with 0 <= I < N (run_parallel's)"
    if not args.out.strip():
        return "--out is empty; give the study's folder, e.g. --out runs/study"
    if args.report is not None and not args.report.strip():
        return "--report is empty; give a markdown file, e.g. --report results.md"
    out = Path(args.out)
    try:
        problem = out_problem(out, report_only=args.report_only)
        if problem is not None or args.worker is not None:
            return problem
        report = Path(args.report) if args.report is not None else out / "results.md"
        return report_problem(report, figure_path(report), out)
    except (OSError, RuntimeError) as exc:  # a name too long, a symlink loop
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        return f"--out {args.out} or --report {args.report}: {why}; give paths you can read " \
               "and write"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    problem = _argument_problem(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from pagctl.errors import PagctlError
    from pagctl.study.plan import digits_study
    from pagctl.study.report import figure_path, write_report
    from pagctl.study.run import run_parallel, run_study

    out = Path(args.out)
    study = digits_study(out, quick=args.quick)
    report = Path(args.report) if args.report is not None else out / "results.md"
    figure = figure_path(report)

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    try:
        if args.worker is not None:  # one of run_parallel's processes: no report
            index, count = (int(v) for v in args.worker.split("/"))
            run_study(study, out, device=args.device, log=log, part=(index, count))
            return 0
        from pagctl.figures import pyplot

        pyplot("--report's figure")  # matplotlib is there, before hours of training
        if args.report_only:
            seconds = None
        elif args.jobs > 1:
            seconds = run_parallel(study, out, args.jobs, device=args.device, log=log)
        else:
            seconds = run_study(study, out, device=args.device, log=log)
        write_report(study, out, report, seconds=seconds, figure=figure,
                     warn=lambda line: print(line, file=sys.stderr))  # even with --quiet
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue", file=sys.stderr)
        return 130
    except (PagctlError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a folder that became unwritable, a full disk
        print(f"error: cannot write {exc.filename or 'a file'} ({exc.strerror or exc}); give "
              "--out and --report where there is room and you can write", file=sys.stderr)
        return 2
    log(f"wrote {report} and {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
