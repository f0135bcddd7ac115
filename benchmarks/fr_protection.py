"""The face-recognition protection tables of docs/benchmarks.md, for every method, under the evaluation protocol.

Leave-one-out black box over the calibrated judges, dodging on the first ``--n-pairs`` pairs, impersonation of
the 4 standard targets from the first ``--n-per-target`` sources, robustness, quality and speed
(:mod:`faceshield.eval.protocol`). One evaluation per method, each saved as it finishes, so an interrupted run
resumes at the method it stopped in; then one merged report and the markdown tables.

    python benchmarks/fr_protection.py -o runs/fr-protection   # cloak@mid, pgd, tip-im; 100 pairs, 25 per target
    python benchmarks/fr_protection.py --methods cloak@low,cloak@high --n-per-target 0 -o runs/fr-protection

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
from faceshield.eval.report import merge_results, write_report
from faceshield.fileio import write_text_atomic

ROBUSTNESS = {"jpeg75": "after JPEG 75", "resize0.5": "after resize ×0.5", "blur1": "after blur σ 1"}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def tables(result: dict) -> str:
    """Markdown tables: dodging by held-out judge, impersonation by target, quality and speed."""
    judges, far = result["judges"], "0.01"
    methods = result["methods"]
    out = [f"Dodging PSR at FAR 1e-2 by held-out judge ({result['n_dodging']} pairs); the mean over judges at "
           "FAR 1e-3 and after each degradation:", "",
           "| method | " + " | ".join(judges) + " | mean | mean @1e-3 | " + " | ".join(ROBUSTNESS.values()) + " |",
           "|---" * (len(judges) + 3 + len(ROBUSTNESS)) + "|"]
    floor = result["floor"]["dodging"]
    cells = [_pct(floor[j][far]) for j in judges] + [_pct(_mean([floor[j][f] for j in judges])) for f in (far, "0.001")]
    out.append("| unprotected (floor) | " + " | ".join(cells + [""] * len(ROBUSTNESS)) + " |")
    for spec, m in methods.items():
        per = m["judges"]
        row = [_pct(per[j]["dodging"][far]) for j in judges]
        row.append(f"**{_pct(_mean([per[j]['dodging'][far] for j in judges]))}**")
        row.append(_pct(_mean([per[j]["dodging"]["0.001"] for j in judges])))
        for kind in ROBUSTNESS:
            row.append(_pct(_mean([per[j]["robustness"][kind][far] for j in judges if "robustness" in per[j]])))
        out.append(f"| {spec} | " + " | ".join(row) + " |")

    targets = result.get("targets") or []
    if targets and result.get("n_impersonation_per_target"):
        names = [Path(t).stem for t in targets]
        out += ["", f"Impersonation PSR at FAR 1e-2 ({result['n_impersonation_per_target']} sources per target), "
                "mean over held-out judges, by target; then by judge, mean over targets:", "",
                "| method | " + " | ".join(names) + " | " + " | ".join(judges) + " | mean |",
                "|---" * (len(names) + len(judges) + 2) + "|"]
        imp_floor = result["floor"].get("impersonation", {})
        if imp_floor:
            cells = [""] * len(names) + [_pct(imp_floor[j][far]) for j in judges]
            cells.append(_pct(_mean([imp_floor[j][far] for j in judges])))
            out.append("| unprotected (floor) | " + " | ".join(cells) + " |")
        for spec, m in methods.items():
            per = m["judges"]
            by_target = [_mean([per[j]["impersonation"][t][far] for j in judges]) for t in targets]
            by_judge = [_mean([per[j]["impersonation"][t][far] for t in targets]) for j in judges]
            out.append(f"| {spec} | " + " | ".join(_pct(x) for x in by_target + by_judge)
                       + f" | **{_pct(_mean(by_judge))}** |")

    out += ["", "Quality of the whole protected photo (mean, minimum in brackets; BRISQUE: lower is better) and "
            "seconds per photo:", "", "| method | PSNR dB | SSIM | BRISQUE | s per photo |", "|---|---|---|---|---|"]
    for spec, m in methods.items():
        q, lo = m["quality"], m["quality_min"]
        out.append(f"| {spec} | {q['psnr']:.1f} ({lo['psnr']:.1f}) | {q['ssim']:.3f} ({lo['ssim']:.3f}) | "
                   f"{q['brisque']:.1f} | {q['seconds']:.1f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="cloak@mid,pgd,tip-im", help="comma-separated method specs")
    parser.add_argument("--pairs", type=Path, default=Path("../shared/data/celebahq-pairs"))
    parser.add_argument("--targets", type=Path, default=Path("../shared/data/targets"))
    parser.add_argument("--n-pairs", type=int, default=100)
    parser.add_argument("--n-per-target", type=int, default=25)
    parser.add_argument("-o", "--output", type=Path, default=Path("runs/fr-protection"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    for spec in filter(None, args.methods.split(",")):
        folder = args.output / spec
        if (folder / "report.json").is_file():
            logging.info("%s: already evaluated in %s", spec, folder)
            continue
        config = EvalConfig(methods=(spec,), pairs_dir=args.pairs, targets_dir=args.targets, n_pairs=args.n_pairs,
                            n_per_target=args.n_per_target)
        write_report(evaluate(config), folder)
    runs = [json.loads(p.read_text()) for p in sorted(args.output.glob("*/report.json"))]
    merged = merge_results(runs)
    merged["config"]["command"] = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    write_report(merged, args.output)
    text = tables(merged)
    write_text_atomic(args.output / "tables.md", text)
    print(text)


if __name__ == "__main__":
    main()
