"""What the tests and the benchmarks share: synthetic audio and tiny real models.

Not part of the product (not installed with it; the product never imports it): it is
imported from a checkout's root, where pytest and the `bench/` scripts run.
"""
