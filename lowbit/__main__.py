"""`python -m lowbit ...`: the same entry point as the `lowbit` script."""
import sys

from lowbit.cli import main

sys.exit(main())
