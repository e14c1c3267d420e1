"""Service metrics kept in Redis, so every process (API workers, Celery workers on other
machines) adds to the same numbers; the API exposes them at `GET /metrics`.

The job state machine (`shared.jobs`) counts outcomes in the same Lua script that makes
the move, so a count is written exactly once, by the process whose move won.
"""
from __future__ import annotations

JOB_DURATION_BUCKETS = [1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 10800.0]
"""Upper bounds (seconds) of the run-time histogram of succeeded jobs (start to finish)."""

AUDIO_SECONDS_BUCKETS = [10.0, 30.0, 60.0, 180.0, 300.0, 600.0, 1800.0, 3600.0, 10800.0]
"""Upper bounds (seconds of input audio) of the processed-audio histogram of succeeded jobs."""
