"""Audio files: decoding uploads, reading and writing PCM, output formats. Imports only the package root's base modules (never Redis, Celery, Flask or torch)."""
