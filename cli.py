"""`python cli.py ...` is the same as the `lit-align` console script."""

from lit_align.cli import main

if __name__ == "__main__":
    main()
