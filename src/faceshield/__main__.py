"""``python -m faceshield``: the same command line as ``faceshield``."""

from faceshield.cli.main import main

if __name__ == "__main__":
    main()
