"""Every HPCBATCH_* environment variable name, defined once.

The coordinator builds a task's environment from these names; the agent only
applies what it is sent, so it never needs to know them.
"""

HOME = "HPCBATCH_HOME"

# clients of a running service (hpcbatch serve)
URL = "HPCBATCH_URL"  # a service to use instead of an embedded coordinator
KEY = "HPCBATCH_KEY"  # its API key
CAFILE = "HPCBATCH_CAFILE"  # the CA (or self-signed certificate) of an https service

POOL_ID = "HPCBATCH_POOL_ID"
NODE_ID = "HPCBATCH_NODE_ID"
JOB_ID = "HPCBATCH_JOB_ID"
TASK_ID = "HPCBATCH_TASK_ID"
TASK_INDEX = "HPCBATCH_TASK_INDEX"
TASK_DIR = "HPCBATCH_TASK_DIR"
TASK_WORKING_DIR = "HPCBATCH_TASK_WORKING_DIR"
NODE_SHARED_DIR = "HPCBATCH_NODE_SHARED_DIR"
JOB_PREP_DIR = "HPCBATCH_JOB_PREP_DIR"  # (only in a job with a preparation task)
# an application package's directory on the node: APP_PREFIX + NAME + "_" + VERSION, and
# APP_PREFIX + NAME for a reference to its default version (hpcbatch.apps.env_key)
APP_PREFIX = "HPCBATCH_APP_"
TASK_ATTEMPT = "HPCBATCH_TASK_ATTEMPT"

# multi-instance tasks
HOST_LIST = "HPCBATCH_HOST_LIST"
NODE_LIST = "HPCBATCH_NODE_LIST"
MASTER_NODE = "HPCBATCH_MASTER_NODE"
HOSTFILE = "HPCBATCH_HOSTFILE"
SSH_CONFIG = "HPCBATCH_SSH_CONFIG"
TASK_SHARED_DIR = "HPCBATCH_TASK_SHARED_DIR"
INSTANCE_INDEX = "HPCBATCH_INSTANCE_INDEX"
NUM_INSTANCES = "HPCBATCH_NUM_INSTANCES"
# hpcbatch-mpiexec: seconds until every rank must have started (launch/mpi.py's default)
LAUNCH_TIMEOUT = "HPCBATCH_LAUNCH_TIMEOUT_S"
# the pool's MPI installation on the nodes (its bin/mpiexec), set by the agent for tasks
MPI_PREFIX = "HPCBATCH_MPI_PREFIX"

# storage: the cap of each node's cache of resource files (MiB), and of the task
# stdout/stderr the coordinator keeps per attempt (bytes; the tail is kept beyond it)
NODE_CACHE_MB = "HPCBATCH_NODE_CACHE_MB"
LOG_CAP_BYTES = "HPCBATCH_LOG_CAP_BYTES"
# hpcbatch-mpiexec -> each rank: TOKEN@ADDRESS:PORT of the primary's launch listener; a
# rank about to MPI_Abort says so there, and hpcbatch-mpiexec ends an mpiexec that has
# not ended ABORT_GRACE seconds later (PRRTE can hang after an abort across nodes)
LAUNCH_ABORT = "HPCBATCH_LAUNCH_ABORT"

# set by launchers so a kernel can measure launch time from the submit side
LAUNCH_T0 = "HPCBATCH_LAUNCH_T0"

# a random token per agent start, in every task it runs: finds a lost local node's
# processes even when the agent died before reporting their pids
AGENT_TOKEN = "HPCBATCH_AGENT_TOKEN"

# set by a node itself (its sshd's SetEnv; the test cluster does this) to name the node
# a process runs on: remote MPI ranks report it, since HPCBATCH_NODE_ID is the primary's
NODE_NAME = "HPCBATCH_NODE"

# what hpcbatch-mpiexec forwards to every rank: task-wide, true on every node
FORWARD_TO_RANKS = (POOL_ID, JOB_ID, TASK_ID, TASK_ATTEMPT, NUM_INSTANCES, HOST_LIST,
                    NODE_LIST, MASTER_NODE, LAUNCH_T0)

# a Slurm pool's multi-instance tasks: JSON {node id: [Slurm job id, Slurm node name]} of
# the pool's nodes, so hpcbatch-mpiexec launches inside the allocation (srun / PRRTE)
SLURM_NODES = "HPCBATCH_SLURM_NODES"
