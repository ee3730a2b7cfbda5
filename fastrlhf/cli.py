"""The ``fastrlhf`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastrlhf", description="Fused kernels and a reference pipeline for RLHF.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and available backends")
    args = parser.parse_args(argv)
    if args.command == "info":
        from fastrlhf._info import info_text

        print(info_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
