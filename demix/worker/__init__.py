"""The worker: the Celery task (`tasks`), the job runner (`runner`), model loading
(`models`) and the separation engine (`engine`)."""
