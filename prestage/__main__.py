"""`python -m prestage`: the same command line as the `prestage` script."""

from prestage.runner.cli import main

if __name__ == "__main__":
    main()
