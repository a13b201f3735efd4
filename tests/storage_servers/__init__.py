"""Local S3/OSS servers for storage tests (see fixtures.py)."""
