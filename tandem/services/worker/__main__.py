"""``python -m tandem.services.worker``."""

from tandem.services.worker.service import main

if __name__ == "__main__":
    raise SystemExit(main())
