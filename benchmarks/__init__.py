"""hpcbatch's benchmark suite: ``hpcbatch bench`` (installed as hpcbatch.benchmarks) or
``python -m benchmarks`` from a checkout; each bench_<what>.py also runs on its own."""
