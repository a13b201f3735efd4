"""Alibaba Cloud OSS (oss2) behind the storage interface."""
