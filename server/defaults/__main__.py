"""`python -m loramerge.server.defaults --cache-dir DIR`: prepare the default model and adapters."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import prepare_defaults


def main() -> None:
    """Prepare the defaults into `--cache-dir` and print where they are."""
    parser = argparse.ArgumentParser(
        prog="python -m loramerge.server.defaults", description=__doc__
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=Path("~/.cache/loramerge"), help="where to cache them"
    )
    args = parser.parse_args()
    started = time.monotonic()
    assets = prepare_defaults(args.cache_dir, progress=lambda line: print(line, flush=True))
    print(f"model: {assets.model_dir}")
    for name, path in assets.adapters.items():
        print(f"adapter {name}: {path}")
    print(f"ready in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
