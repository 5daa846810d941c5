#!/usr/bin/env python3
"""LibriSpeech -> SpeechBrain CSV manifests (ID, duration, wav, spk_id, wrd); the training scripts
run it themselves (recipes.librispeech). By hand:

    python librispeech_prepare.py /data/LibriSpeech results/prep --train_splits train-clean-100 \
        --dev_splits dev-clean --test_splits test-clean test-other
"""

import argparse
import logging
import sys

from recipes import run_cli
from recipes.librispeech import prepare_librispeech


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_folder", help="the LibriSpeech folder (holding the splits)")
    parser.add_argument("save_folder", help="where the CSV manifests are written")
    # the recipes' key names (--tr_splits / --te_splits: older spellings)
    parser.add_argument("--train_splits", "--tr_splits", nargs="*", default=["train-clean-100"])
    parser.add_argument("--dev_splits", nargs="*", default=["dev-clean"])
    parser.add_argument("--test_splits", "--te_splits", nargs="*",
                        default=["test-clean", "test-other"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    prepare_librispeech(args.data_folder, args.save_folder, args.train_splits, args.dev_splits,
                        args.test_splits, merge_lst=args.train_splits)


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
