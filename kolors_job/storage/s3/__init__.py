"""S3 (boto3) behind the storage interface."""
