"""The benchmarks (run as scripts: python benchmarks/<name>.py) and their shared harness."""
