#!/usr/bin/env python3
"""Federated client 2: holds the XOR rows (1,0)->1 and (1,1)->0.

Run python client2.py --help for the options.
"""

import sys

from common.client import main
from common.data import CLIENT2_INPUTS, CLIENT2_LABELS
from common.datasets import from_arrays

DESCRIPTION = (
    "Federated GA training client 2. Holds the XOR rows (1,0)->1 and (1,1)->0,\n"
    "never sends them, and evolves the server's model on them each round.\n\n"
    "Exit status: 0 after the server says done, 1 when it cannot go on."
)

if __name__ == "__main__":
    rows = from_arrays("client2.py's XOR rows", CLIENT2_INPUTS, CLIENT2_LABELS)
    sys.exit(main("client2.py", DESCRIPTION, rows))
