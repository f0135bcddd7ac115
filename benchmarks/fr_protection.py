"""The face-recognition protection tables of docs/benchmarks.md, for every method, under the evaluation protocol.

Leave-one-out black box over the calibrated judges, dodging on the first ``--n-pairs`` pairs, impersonation of
the 4 standard targets from the first ``--n-per-target`` sources, robustness, quality and speed
(:mod:`faceshield.eval.protocol`). One evaluation per method, each saved as it finishes; every protected photo is
kept (``--protected``), so an interrupted run resumes at the photo it stopped at, and several processes can share
the work (one per core, each with its own ``--judges`` and ``-o``, the same ``--protected``; a last run over every
judge then only judges). Then one merged report and the markdown tables.

    python benchmarks/fr_protection.py -o runs/fr-protection   # cloak@mid, pgd, tip-im; 100 pairs, 25 per target
    python benchmarks/fr_protection.py --methods cloak@low,cloak@high --n-per-target 0 -o runs/fr-protection
    python benchmarks/fr_protection.py --methods cloak@mid --judges faceres,mobilefacenet -o runs/part-a \
        --protected runs/fr-protection/protected &        # and part b with the other judges, then the full run

Writes ``OUT/<method>/report.{json,html}``, ``OUT/report.{json,html}`` (every method found in OUT) and
``OUT/tables.md``, and prints the tables. The machine is whatever runs it: say which when quoting the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from faceshield.eval.protocol import EvalConfig, evaluate
from faceshield.eval.report import markdown_tables, merge_results, write_report
from faceshield.fileio import write_text_atomic

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="cloak@mid,pgd,tip-im", help="comma-separated method specs")
    parser.add_argument("--pairs", type=Path, default=Path("../shared/data/celebahq-pairs"))
    parser.add_argument("--targets", type=Path, default=Path("../shared/data/targets"))
    parser.add_argument("--n-pairs", type=int, default=100)
    parser.add_argument("--n-per-target", type=int, default=25)
    parser.add_argument("--judges", default="", help="comma-separated held-out judges (default: calibrated strong)")
    parser.add_argument("-o", "--output", type=Path, default=Path("runs/fr-protection"))
    parser.add_argument("--protected", type=Path, default=None, help="folder of the kept protected photos "
                        "(default OUTPUT/protected); runs that share it split the work, e.g. by judge")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    for spec in filter(None, args.methods.split(",")):
        folder = args.output / spec
        if (folder / "report.json").is_file():
            logging.info("%s: already evaluated in %s", spec, folder)
            continue
        config = EvalConfig(methods=(spec,), pairs_dir=args.pairs, targets_dir=args.targets, n_pairs=args.n_pairs,
                            n_per_target=args.n_per_target, judges=tuple(j for j in args.judges.split(",") if j),
                            cache_dir=args.protected or args.output / "protected")
        write_report(evaluate(config), folder)
    runs = [json.loads(p.read_text()) for p in sorted(args.output.glob("*/report.json"))]
    merged = merge_results(runs)
    merged["config"]["command"] = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    write_report(merged, args.output)
    text = markdown_tables(merged)
    write_text_atomic(args.output / "tables.md", text)
    print(text)


if __name__ == "__main__":
    main()
