"""``python -m corral.worker --fd N``: host one agent on an already connected socket."""

from __future__ import annotations

import argparse
import os

from corral.worker.process import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m corral.worker")
    parser.add_argument("--fd", type=int, required=True, help="connected socket to the runtime")
    args = parser.parse_args()
    os._exit(main(args.fd))
