"""Build the generated phantom dataset (the demo's embedded default) into a raw root.

    python datasets/make_phantom.py datasets/raw [--cases 24] [--test-cases 4] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from autoseg.dataset.phantom import PhantomRecipe, make_phantom_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw_root", type=Path)
    parser.add_argument("--cases", type=int, default=PhantomRecipe.num_training)
    parser.add_argument("--test-cases", type=int, default=PhantomRecipe.num_test)
    parser.add_argument("--seed", type=int, default=PhantomRecipe.seed)
    args = parser.parse_args()
    recipe = PhantomRecipe(num_training=args.cases, num_test=args.test_cases, seed=args.seed)
    print(make_phantom_dataset(args.raw_root, recipe))


if __name__ == "__main__":
    main()
