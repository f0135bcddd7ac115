"""How often `faceshield verify` gets real pairs right: every genuine pair train/N vs test/N, and as many
impostor pairs train/N vs test/M (M the next id), with the shipped thresholds and the majority rule.

    python benchmarks/verify_pairs.py ../shared/data/celebahq-pairs [--far 0.01]
"""

import argparse
import json
from pathlib import Path

from faceshield.eval.calibration import embed_pair_set, face_embedder, shipped_table
from faceshield.eval.verify import judge_pair, resolve_models
from faceshield.faces.detect import create_detector
from faceshield.models.ensemble import FREnsemble


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", type=Path)
    parser.add_argument("--far", type=float, default=1e-2)
    parser.add_argument("--models", default="default")
    args = parser.parse_args()
    table = shipped_table()
    names = resolve_models(args.models)
    ids, emb, missing = embed_pair_set(args.pairs, face_embedder(FREnsemble(names), create_detector()),
                                       progress=True)
    n = len(ids)
    same = sum(judge_pair({m: float(emb[m][0][i] @ emb[m][1][i]) for m in names}, table, args.far)["verdict"]
               == "same person" for i in range(n))
    different = sum(judge_pair({m: float(emb[m][0][i] @ emb[m][1][(i + 1) % n]) for m in names}, table,
                               args.far)["verdict"] == "different" for i in range(n))
    result = {"pairs": n, "no_face": missing, "models": names, "far": args.far,
              "genuine_said_same": same / n, "impostor_said_different": different / n}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
