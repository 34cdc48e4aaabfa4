"""Command-line tools, one module each: `python -m vl.tools.<name> --help`."""
