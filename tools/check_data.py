#!/usr/bin/env python3
"""Checks CSV manifests and their audio before training; reports every bad row at once.

    python -m tools.check_data data/mini_corpus/train.csv data/mini_corpus/valid.csv
    python -m tools.check_data /data/LibriSpeech/train.csv --data_folder /data/LibriSpeech

One line per problem (missing, unreadable, empty or too short audio, a sample rate other than
--sample_rate, duplicate or empty ID, empty transcript, unparsable duration), then the counts.
Exit status 1 when a row would stop training (a wrong sample rate does not: it is resampled).
"""

import argparse
import sys
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", nargs="+", help="manifests (columns ID, duration, wav, wrd)")
    p.add_argument("--data_folder", default=None,
                   help="root of relative wav paths (default: each manifest's folder)")
    p.add_argument("--sample_rate", type=int, default=16000, help="the model's rate (16000)")
    p.add_argument("--min_duration", type=float, default=0.1,
                   help="shorter audio is reported (0.1 s, the recipes' min_duration)")
    p.add_argument("--workers", type=int, default=None, help="threads (default: 4 per CPU)")
    args = p.parse_args(argv)

    from recipes.check_data import blocking, check_manifests, report

    start = time.time()
    problems, rows = check_manifests(args.csv, args.data_folder, args.sample_rate,
                                     args.min_duration, args.workers)
    print(report(problems, rows, time.time() - start))
    return 1 if blocking(problems) else 0


if __name__ == "__main__":
    sys.exit(main())
