"""`python -m gateway` is `kore-gateway`."""

from gateway.cli import main

if __name__ == "__main__":
    main()
