"""``python -m tandem.services.frontend``: run the frontend process (see :func:`.service.main`)."""

from tandem.services.frontend.service import main

if __name__ == "__main__":
    raise SystemExit(main())
