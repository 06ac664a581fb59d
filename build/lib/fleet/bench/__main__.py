"""Dispatch `python -m fleet.bench NAME [args]` to `fleet.bench.NAME.main(args)`."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import fleet.bench


def main() -> None:
    names = sorted(m.name for m in pkgutil.iter_modules(fleet.bench.__path__) if not m.name.startswith("_"))
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        print(f"usage: python -m fleet.bench {{{'|'.join(names)}}} [args]", file=sys.stderr)
        sys.exit(2)
    importlib.import_module(f"fleet.bench.{sys.argv[1]}").main(sys.argv[2:])


if __name__ == "__main__":
    main()
