"""A submission from request to queued job: parsing, upload inspection, URL inputs. Never imports torch, Flask, demix.separation or the front ends."""
