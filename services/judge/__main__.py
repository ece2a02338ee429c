"""`python -m selfreward.services.judge [--host H] [--port P]`: the judge service under uvicorn.

Settings come from the environment (see selfreward.services.judge.settings);
`selfreward serve judge` is the same with a --config option.
"""

from __future__ import annotations

import argparse

import uvicorn

from selfreward.services.judge.app import create_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m selfreward.services.judge")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
