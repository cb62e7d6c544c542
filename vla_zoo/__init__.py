"""vla-zoo: command-line entry points and glue (CLI, evaluation, deployment)."""

__version__ = "0.1.0"
