#!/usr/bin/env python3
"""Federated client for your own data: a CSV file or an .npz archive.

    python client.py --data data/iris.csv --port 5000

Run python client.py --help for the options.
"""

import sys

from common.client import main

DESCRIPTION = (
    "Federated GA training client for a data file of your own. Holds the\n"
    "examples of --data, never sends them, and evolves the server's model on\n"
    "them each round.\n\n"
    "--data is a CSV file (a header row, numeric feature columns and one label\n"
    "column) or an .npz archive (arrays x and y). Labels are class numbers\n"
    "0, 1, ... or, with --classes, class names.\n\n"
    "Exit status: 0 after the server says done, 1 when it cannot reach the\n"
    "server or the server breaks the protocol, 2 when the data cannot be read\n"
    "or does not fit the server's model."
)

if __name__ == "__main__":
    sys.exit(main("client.py", DESCRIPTION))
