"""The `factorllm` command line: one subcommand per module in factorllm/commands (and serve)."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import FactorLLMError

SUBCOMMANDS = {
    "serve": "server.cli",
    "info": "factorllm.commands.info",
    "factorize": "factorllm.commands.factorize",
    "export": "factorllm.commands.export",
    "train": "factorllm.commands.train",
    "eval": "factorllm.commands.eval",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="factorllm", description="Factorize dense LLMs into MoE models and serve them.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser



def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except FactorLLMError as e:
        print(f"factorllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
