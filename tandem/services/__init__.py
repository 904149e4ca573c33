"""tandem's processes (frontend, router, indexer, worker, launcher) and their shared runtime.

Each process is ``python -m tandem.services.<name>``; :mod:`tandem.services.runtime` holds what
they share (connection, typed serve/request, discovery, tracing, logging, shutdown).
"""
