"""`python -m fleet` is the same Hydra main as `fleet-train`."""

from fleet.runtime.cli import main

if __name__ == "__main__":
    main()
