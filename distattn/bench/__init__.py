"""Benchmarks and studies that run real (CPU, gloo) jobs and print tables; ``distattn demo`` (:mod:`.demo`)."""
