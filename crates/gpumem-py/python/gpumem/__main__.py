"""``python -m gpumem demo``: the "how to clear GPU memory" walk-through.

Inside PyTorch on a GPU when torch and a GPU are present (gpumem installed as PyTorch's
allocator), and on the simulated device otherwise, saying so.
"""

from __future__ import annotations

import argparse
import sys

from gpumem import demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpumem", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="the walk-through: allocate, del, empty_cache, and the numbers")
    d.add_argument("--device", choices=["auto", "cuda", "sim"], default="auto")
    d.add_argument("--policy", default="gpumem", help="gpumem (default), torch or torch-expandable")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo.run(args.device, args.policy)
    return 2


if __name__ == "__main__":
    sys.exit(main())
