"""Benchmarks that print the project's figure next to a plain baseline measured in the same run, as a ratio:
training throughput inside a Ray Train worker, and serving throughput behind Ray Serve."""
