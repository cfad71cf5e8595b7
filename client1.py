#!/usr/bin/env python3
"""Federated client 1: holds the XOR rows (0,1)->1 and (0,0)->0.

Run python client1.py --help for the options.
"""

import sys

from common.client import main
from common.data import CLIENT1_INPUTS, CLIENT1_LABELS
from common.datasets import from_arrays

DESCRIPTION = (
    "Federated GA training client 1. Holds the XOR rows (0,1)->1 and (0,0)->0,\n"
    "never sends them, and evolves the server's model on them each round.\n\n"
    "Exit status: 0 after the server says done, 1 when it cannot go on."
)

if __name__ == "__main__":
    rows = from_arrays("client1.py's XOR rows", CLIENT1_INPUTS, CLIENT1_LABELS)
    sys.exit(main("client1.py", DESCRIPTION, rows))
