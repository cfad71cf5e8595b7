#!/usr/bin/env python3
"""Train XOR with the server and both clients on this machine: make demo.

Starts server.py on a free port, then client1.py and client2.py against it,
shows their progress, and ends with the server's exit status (0 when the
model reached the target accuracy). Extra arguments go to server.py.
"""

import argparse
import sys
from datetime import datetime
from pathlib import Path

from common.launcher import start_client, start_server, wait_for_federation


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs") / f"demo-{stamp}",
        help="folder for model.keras and history.csv",
    )
    args, server_args = parser.parse_known_args()

    print(f"Starting the server and two clients; results go to {args.out}", flush=True)
    server, port = start_server("--out", str(args.out), *server_args, echo=True)
    clients = [
        start_client(name, port, echo=True) for name in ("client1.py", "client2.py")
    ]
    code, client_codes = wait_for_federation(server, clients, timeout=3600)

    if code == 0 and not any(client_codes):
        print(
            f"\nTrained. Model: {args.out / 'model.keras'}  "
            f"History: {args.out / 'history.csv'}"
        )
    else:
        print(
            f"\nThe run did not reach its target (server exit {code}, "
            f"clients {client_codes}); see {args.out}",
            file=sys.stderr,
        )
    return code or max(client_codes, default=0)


if __name__ == "__main__":
    sys.exit(main())
