#!/usr/bin/env python3
"""Adds an n-gram LM to an exported CTC model folder; transcribe.py and
inference.Transcriber then decode with it (see inference.word_lm for the two kinds).

    python -m inference.make_word_lm demo_results/inference data/mini_corpus/sentences.txt \
        --exclude data/mini_corpus/valid.csv data/mini_corpus/test.csv
    python -m inference.make_word_lm MODEL_DIR train.csv --kind lexicon --order 4

Sources are CSV manifests (their transcript column) or text files (one sentence per line).
--kind token (default) writes MODEL_DIR/token_lm.arpa, an n-gram LM over the tokenizer's pieces
for lexicon-free decoding (new words can still be spelled); --kind lexicon writes lexicon.txt and
word_lm.arpa (only lexicon words are decoded). Either way ctc_lm.json records the kind and the
weights. Needs flashlight-text at decoding time (pip install -r requirements-lm.txt).
"""

import argparse
import sys

from recipes import RecipeError, run_cli


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="exported CTC folder (<output_folder>/inference)")
    p.add_argument("sources", nargs="+", metavar="TEXT",
                   help="CSV manifests and/or text files whose sentences train the LM")
    p.add_argument("--kind", choices=("token", "lexicon"), default="token")
    p.add_argument("--order", type=int, default=None, help="n-gram order (token 6, lexicon 3)")
    p.add_argument("--exclude", nargs="*", default=[], metavar="TEXT",
                   help="CSVs/text files whose sentences are left out (your evaluation sets)")
    p.add_argument("--lm-weight", type=float, default=None,
                   help="weight recorded for decoding (token 0.5, lexicon 2.0); tune it on "
                        "a validation set")
    p.add_argument("--word-score", type=float, default=0.0)
    p.add_argument("--column", default="wrd", help="transcript column of the CSVs (wrd)")
    args = p.parse_args(argv)

    from inference.transcriber import model_kind
    from inference.word_lm import add_ctc_lm

    if model_kind(args.model_dir) != "CTC":
        raise RecipeError(f"{args.model_dir} holds an S2S model: these LMs are for CTC models "
                          "(S2S models decode with their exported Transformer LM)")
    r = add_ctc_lm(args.model_dir, args.sources, args.kind, args.order, args.exclude,
                   args.column, args.lm_weight, args.word_score)
    what = (f"token {r['order']}-gram LM" if r["kind"] == "token" else
            f"lexicon of {r['words'] - r['skipped']} words ({r['skipped']} not spellable with "
            f"the tokenizer left out) and word {r['order']}-gram LM")
    print(f"{args.model_dir}: {what} of {r['sentences']} sentences ({r['excluded']} excluded)")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
