#!/usr/bin/env python3
"""Adds a lexicon and a word n-gram LM to an exported CTC model folder; transcribe.py and
inference.transcriber.Transcriber then decode with them (lexicon words only, LM-weighted).

    python -m tools.make_word_lm demo_results/inference data/mini_corpus/train.csv
    python -m tools.make_word_lm MODEL_DIR train.csv other.csv --order 4

Writes MODEL_DIR/lexicon.txt (every transcript word spelled with the model's tokenizer) and
MODEL_DIR/word_lm.arpa (back-off n-gram model of the transcripts). Needs flashlight-text at
decoding time (pip install -r requirements-lm.txt).
"""

import argparse
import sys

from recipes import RecipeError, run_cli


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="exported CTC folder (<output_folder>/inference)")
    p.add_argument("csv", nargs="+", help="CSV manifests whose transcripts train the LM")
    p.add_argument("--order", type=int, default=3, help="n-gram order (3)")
    p.add_argument("--column", default="wrd", help="transcript column of the CSVs (wrd)")
    args = p.parse_args(argv)

    from inference.transcriber import model_kind
    from inference.word_lm import add_word_lm

    if model_kind(args.model_dir) != "CTC":
        raise RecipeError(f"{args.model_dir} holds an S2S model: the word LM is for CTC models "
                          "(S2S models decode with their exported token LM)")
    n_words, skipped, n_sentences = add_word_lm(args.model_dir, args.csv, args.order, args.column)
    print(f"{args.model_dir}: lexicon of {n_words - skipped} words ({skipped} not spellable with "
          f"the tokenizer left out), {args.order}-gram LM of {n_sentences} sentences")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
