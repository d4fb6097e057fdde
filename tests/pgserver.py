"""A throwaway PostgreSQL server on loopback for the tests (Debian's `postgresql` package; `make test` installs it).

The server itself lives in zqdata/loopback.py, shared with `make distributed` (orchestration does not import tests/).
"""

from zqdata.loopback import pg_bin, postgres_server  # noqa: F401
