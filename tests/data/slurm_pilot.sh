#!/bin/sh
# hpcbatch pilot job: holds this allocation for pool slurm3 of hpcbatch home 0123abcd.
# The coordinator starts one agent per node inside it with
#   srun --jobid=$SLURM_JOB_ID -w NODE -N1 -n1 --overlap /opt/venv/bin/python .../agent.py ...
# and gives the nodes back with scancel. Nothing else runs here.
exec sleep infinity
