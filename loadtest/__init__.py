"""Load tests and benchmarks of kvgate against its peers."""
