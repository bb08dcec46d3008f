"""`python -m worldserve.cli ...` is the `worldserve` command."""

from .main import main

if __name__ == "__main__":
    main()
