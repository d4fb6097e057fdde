"""Subcommands of `zq`. A module here defines `register(subparsers)`; each parser sets `func=`."""
