# The environment a multi-node GPU job needs, in one place. Source it in every launcher (the sbatch
# templates and torchrun_multinode.sh do); each value is a default: export your own before sourcing to change it.
# Settings follow torchtitan's and Megatron-LM's launchers.

# -- NCCL: fail fast and loudly instead of hanging
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=3}"   # a failed/timed-out collective aborts the communicator, skips the
                                            # teardown that can itself hang, and ends the process (torchrun/Slurm
                                            # then restart or requeue the job)
: "${TORCH_NCCL_DUMP_ON_TIMEOUT:=1}"        # on a timeout, write the flight recorder (which collective, which
: "${TORCH_FR_BUFFER_SIZE:=2000}"           # ranks) to TORCH_FR_DUMP_TEMP_FILE<rank>: needs the buffer size > 0
: "${TORCH_FR_DUMP_TEMP_FILE:=${VLP_RUN_DIR:-/tmp}/nccl_trace_rank_}"
: "${NCCL_DEBUG:=WARN}"                     # INFO to see the topology/transport picked on the first run
: "${NCCL_IB_TIMEOUT:=19}"                  # InfiniBand retry timeout 4.096 us * 2^19 ~ 2 s (Megatron's value;
                                            # the default 18 aborts jobs on busy fabrics)
# VLP_PG_TIMEOUT_S (not set here; default 600 s, or the config's parallel.timeout_s): bounds every start-up wait
# (store, rank check-in) and every collective; a start-up timeout names the missing ranks and their nodes.
# Hundreds of ranks or slow shared file systems may need more (the 7B example job sets 1800).

# -- CUDA / PyTorch
: "${TORCH_NCCL_AVOID_RECORD_STREAMS:=1}"   # frees TP/SP communication buffers at once instead of via
                                            # recordStream (lower peak memory with tensor parallelism)
# CUDA_DEVICE_MAX_CONNECTIONS (not set here): Megatron sets 1 so that TP/SP communication kernels run in issue
# order; with FSDP (dp > 1 here) one hardware queue also serialises the parameter all-gathers behind compute,
# so set it only for tensor-parallel-heavy layouts after a profile shows the gain.
: "${PYTORCH_CUDA_ALLOC_CONF:=expandable_segments:True}"  # less fragmentation with varying image counts
: "${PYTHONFAULTHANDLER:=1}"                # a Python stack on SIGSEGV/SIGABRT/timeouts in every rank's log
: "${PYTHONUNBUFFERED:=1}"                  # logs reach the files as they are written (preempted jobs too)
: "${OMP_NUM_THREADS:=1}"                   # data workers and ranks share the node's cores; torch's default
                                            # (all cores per process) oversubscribes 8 ranks x N cores

export TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_DUMP_ON_TIMEOUT TORCH_FR_BUFFER_SIZE \
    TORCH_FR_DUMP_TEMP_FILE NCCL_DEBUG NCCL_IB_TIMEOUT TORCH_NCCL_AVOID_RECORD_STREAMS \
    PYTORCH_CUDA_ALLOC_CONF PYTHONFAULTHANDLER PYTHONUNBUFFERED OMP_NUM_THREADS

# Site-specific, left unset: NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME (the interface the nodes reach each other
# on, e.g. ib0 or eth0, when the default route is a management network), NCCL_IB_HCA, NCCL_NET_GDR_LEVEL.
