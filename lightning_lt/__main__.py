"""``python -m lightning_lt`` runs the ``lightning-lt`` command line."""

from lightning_lt.cli import main

if __name__ == "__main__":
    main()
