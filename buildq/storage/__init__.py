"""The SQL base the queue and the build store both stand on.

- ``database``: engines with buildq's session settings, ``Database`` (transactions retried on
  transient errors, driver errors translated at one choke point) and ``DbClock``.
- ``dialect``: every SQL difference between MySQL/MariaDB and SQLite that statements need.
- ``columns``: column types and table options shared by every table, and the name limits
  that config and request decoding check against the columns.
- ``errors``: the storage errors, and the one line of a driver error shown to people.

It imports nothing from ``buildq.queue``, ``buildq.orchestrator``, ``buildq.config`` or
``buildq.cli`` (``make imports`` checks): the queue's SQL backend and the build store are
peers on top of it, and neither imports the other's tables or statements.
"""
