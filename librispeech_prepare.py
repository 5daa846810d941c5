#!/usr/bin/env python3
"""LibriSpeech -> SpeechBrain CSV manifests (ID, duration, wav, spk_id, wrd); the training scripts
run it themselves (recipes.librispeech). By hand:

    python librispeech_prepare.py /data/LibriSpeech results/prep --tr_splits train-clean-100 \
        --dev_splits dev-clean --te_splits test-clean test-other
"""

import argparse
import logging

from recipes.librispeech import prepare_librispeech


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_folder")
    parser.add_argument("save_folder")
    parser.add_argument("--tr_splits", nargs="*", default=["train-clean-100"])
    parser.add_argument("--dev_splits", nargs="*", default=["dev-clean"])
    parser.add_argument("--te_splits", nargs="*", default=["test-clean", "test-other"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    prepare_librispeech(args.data_folder, args.save_folder, args.tr_splits, args.dev_splits,
                        args.te_splits, merge_lst=args.tr_splits)


if __name__ == "__main__":
    main()
