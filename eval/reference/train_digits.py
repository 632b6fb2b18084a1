"""Train `ref-digits` (and the digits classifier): `train.py --model ref-digits`, under the command its model card
was first written with.

    python -m fastdiff.eval.reference.train_digits --out fastdiff/eval/reference/weights
"""

from __future__ import annotations

import sys

from . import train


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    train.main(["--model", "ref-digits", *argv])


if __name__ == "__main__":
    main()
