"""Entry point: `accelerate launch train.py --config configs/qlora/....yaml [key=value ...]`."""
import sys

from lowbit.recipes.cli import main

if __name__ == "__main__":
    sys.exit(main())
