"""What the API and the worker both need: settings, the Celery app, job records,
storage and audio I/O. Nothing here imports torch."""
