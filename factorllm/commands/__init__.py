"""One module per `factorllm` subcommand; each has `add_arguments(parser)` and `run(args)`."""
