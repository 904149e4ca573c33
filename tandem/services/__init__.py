"""tandem's processes (frontend, router, indexer, worker, launcher) and their shared runtime.

Each process is ``python -m tandem.services.<name>``; :mod:`tandem.services.runtime` (connection, life
cycle, shutdown), :mod:`tandem.services.messaging` (typed serve/request/publish),
:mod:`tandem.services.observability` (tracing, logging) and :mod:`tandem.services.discovery`
hold what they share.
"""
