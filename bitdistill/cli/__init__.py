"""The ``bitdistill`` console script: one thin subcommand module per library entry point."""
