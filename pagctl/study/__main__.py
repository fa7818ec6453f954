"""``python -m pagctl.study``: train, measure and report the digits study (``make study``,
``make study-quick``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pagctl.study",
        description="The paper's claims on the embedded digits: a lambda sweep (NN, SBG), "
        "three seeds, four architectures, AutoAttack L2 and Linf at two budgets, alignment; "
        "trains and measures what is missing under --out, then writes the report.")
    parser.add_argument("--out", type=Path, default=Path("runs/study"),
                        help="folder of the study's runs (default runs/study)")
    parser.add_argument("--report", type=Path, default=None,
                        help="report to write (default OUT/results.md)")
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
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give the study's folder")
    if args.report is not None and args.report.is_dir():
        parser.error(f"--report {args.report} is a folder; give a file, e.g. "
                     f"{args.report / 'results.md'}")
    from pagctl.errors import PagctlError
    from pagctl.study.plan import digits_study
    from pagctl.study.report import write_report
    from pagctl.study.run import run_parallel, run_study

    study = digits_study(args.out, quick=args.quick)
    report = args.report or args.out / "results.md"

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    try:
        if args.worker is not None:  # one of run_parallel's processes: no report
            index, count = (int(v) for v in args.worker.split("/"))
            run_study(study, args.out, device=args.device, log=log, part=(index, count))
            return 0
        if args.report_only:
            seconds = None
        elif args.jobs > 1:
            seconds = run_parallel(study, args.out, args.jobs, device=args.device, log=log)
        else:
            seconds = run_study(study, args.out, device=args.device, log=log)
        figure = report.with_name(f"{report.stem}-lambda.png")
        write_report(study, args.out, report, seconds=seconds, figure=figure)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue", file=sys.stderr)
        return 130
    except (PagctlError, KeyError, RuntimeError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return 2
    log(f"wrote {report} and {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
