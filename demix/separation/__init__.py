"""The torch engine: models, their weights, streaming separation of a mix into stems. Imports no Redis, Celery or Flask, and nothing from demix.jobs, demix.intake or the edges."""
