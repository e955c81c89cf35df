"""The `hiermoe` command line: subcommands fit/validate/test, plan and bench."""
