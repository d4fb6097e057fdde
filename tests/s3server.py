"""A throwaway S3-protocol server on loopback (``moto_server`` from the venv) for the tests of the S3 path.

The server itself lives in zqdata/loopback.py, shared with `make distributed` (orchestration does not import tests/).
"""

from zqdata.loopback import free_port, moto_executable, moto_server  # noqa: F401
