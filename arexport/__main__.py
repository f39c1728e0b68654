"""`python -m arexport` runs the CLI (same as the `arexport` command)."""

from arexport.cli import main

if __name__ == "__main__":
    main()
