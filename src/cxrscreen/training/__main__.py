"""`python -m cxrscreen.training ARGS`, what torchrun starts: `cxrscreen train ARGS` in each process.

    torchrun --nproc_per_node N -m cxrscreen.training --data ... --split ... --out RUN
"""

from __future__ import annotations

import sys

from cxrscreen.engine.distributed import shutdown


def main(argv: list[str] | None = None) -> None:
    """Run `cxrscreen train ARGS` in this process (the command line's own parser and errors), then leave the
    process group."""
    from cxrscreen.cli import app

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        app(["train", *args], prog_name="cxrscreen.training", standalone_mode=True)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
