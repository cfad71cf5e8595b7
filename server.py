#!/usr/bin/env python3
"""Federated GA training server: python server.py --help."""

import sys

from common.config import configure_logging, parse_server_args


def main() -> int:
    config = parse_server_args()
    configure_logging()
    # Imported after parsing: TensorFlow takes seconds to load.
    from common.server import serve

    try:
        return serve(config)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
