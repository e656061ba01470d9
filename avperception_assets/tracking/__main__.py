"""`python -m avperception_assets.tracking evaluate --gt GT --pred PRED`: BDD100K's box_track figures
of tracker output against ground truth (box_track_20 JSON files or folders), printed as JSON."""

from __future__ import annotations

import argparse
import json
import sys

from avperception_assets.tracking.labels import MotFileError
from avperception_assets.tracking.metrics import evaluate_paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avperception_assets.tracking")
    commands = parser.add_subparsers(dest="command", required=True)
    evaluate = commands.add_parser("evaluate", help="print MOTA, MOTP, IDF1, … overall, per class and super-category")
    evaluate.add_argument("--gt", required=True, help="ground truth: a box_track_20 JSON file or a folder of them")
    evaluate.add_argument("--pred", required=True, help="tracker output (with ids and scores), a file or a folder")
    args = parser.parse_args(argv)
    try:
        figures = evaluate_paths(args.gt, args.pred)
    except MotFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(figures, indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
