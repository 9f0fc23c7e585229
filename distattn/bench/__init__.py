"""Benchmarks and studies that run real (CPU, gloo) jobs and print tables."""
