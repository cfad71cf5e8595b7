#!/usr/bin/env python3
"""Federated client 2: holds the XOR rows (1,0)->1 and (1,1)->0.

Run python client2.py --help for the options.
"""

import sys

from common.client import run_client
from common.config import configure_logging, parse_client_args
from common.data import CLIENT2_INPUTS, CLIENT2_LABELS

DESCRIPTION = (
    "Federated GA training client 2. Holds the XOR rows (1,0)->1 and (1,1)->0,\n"
    "never sends them, and evolves the server's model on them each round.\n\n"
    "Exit status: 0 after the server says done, 1 when it cannot go on."
)


def main() -> int:
    config = parse_client_args("client2.py", DESCRIPTION)
    configure_logging(config.quiet)
    try:
        return run_client(config, CLIENT2_INPUTS, CLIENT2_LABELS)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
