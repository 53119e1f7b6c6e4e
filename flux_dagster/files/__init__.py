"""Generated files (reference §3.6, §3.11 ``/worker/generate-file``): rendering a node's text to a
document, and the store that keeps it (S3 in production, a local folder by default)."""
