"""``python -m tandem.services.router``."""

from tandem.services.router.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
