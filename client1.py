#!/usr/bin/env python3
"""Federated client 1: holds the XOR rows (0,1)->1 and (0,0)->0.

Run python client1.py --help for the options.
"""

import sys

from common.client import run_client
from common.config import configure_logging, parse_client_args
from common.data import CLIENT1_INPUTS, CLIENT1_LABELS

DESCRIPTION = (
    "Federated GA training client 1. Holds the XOR rows (0,1)->1 and (0,0)->0,\n"
    "never sends them, and evolves the server's model on them each round.\n\n"
    "Exit status: 0 after the server says done, 1 when it cannot go on."
)


def main() -> int:
    config = parse_client_args("client1.py", DESCRIPTION)
    configure_logging(config.quiet)
    try:
        return run_client(config, CLIENT1_INPUTS, CLIENT1_LABELS)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
