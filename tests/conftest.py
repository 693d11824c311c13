"""Shared pytest fixtures: a real S3-compatible server on 127.0.0.1 (see tests/s3_server.py)."""

from tests.s3_server import s3_server, s3_server_session  # noqa: F401 - fixtures re-exported
