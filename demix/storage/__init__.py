"""Where job files live: the storage interface, the local folder and S3 backends. Imports only the package root's base modules (never demix.jobs, demix.intake, torch)."""
