"""mpi4py kernels and the harness that runs them (see hpcbatch.kernels.api)."""
