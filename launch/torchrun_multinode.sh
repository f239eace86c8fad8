#!/usr/bin/env bash
# Multi-node training with torchrun, without Slurm (other schedulers, or by hand): run this on EVERY node
# with the same settings; the nodes meet at RDZV_ENDPOINT (c10d rendezvous, hosted by the agent on that host).
#
#   NNODES=4 NPROC_PER_NODE=8 RDZV_ENDPOINT=10.0.0.1:29500 RDZV_ID=stage2-run1 \
#       bash launch/torchrun_multinode.sh configs/deepseek-vl-7b/stage2.yaml [KEY=VALUE ...]
#
# Variables:
#   NNODES          node count (required); "MIN:MAX" lets torchrun start with MIN and admit late nodes
#   NPROC_PER_NODE  ranks per node (default: the GPUs nvidia-smi lists, else 1)
#   RDZV_ENDPOINT   host:port every node can reach (required; an IP address where node names do not resolve)
#   RDZV_ID         the job's name, the same on every node (default vlpretrain): two jobs on one endpoint
#                   need different ids
#   MAX_RESTARTS    after a rank fails (crash, killed, lost node) torchrun restarts the workers of EVERY node
#                   this many times; they resume from the last checkpoint (--resume auto) (default 2)
#   LOCAL_ADDR      this node's address for the rendezvous (torchrun --local-addr; default: its host name)
#   RESUME          auto (default): continue from the run's newest good checkpoint; "" to start a fresh run
#                   (refused in a run dir that holds a run: add --set checkpoint.overwrite=true to move it aside)
#   RUN_DIR         default: the config's train.run_dir
#   TORCHRUN_ARGS   more torchrun options (e.g. --monitor-interval=1)
#   PYTHON          default python3
# and the cluster environment of launch/cluster_env.sh (NCCL, timeouts), each overridable.
#
# Exit status: 0 done; 42 preempted (SIGTERM/SIGUSR1/...: every rank saved a checkpoint; start it again to
# resume); anything else: failed after MAX_RESTARTS restarts. torchrun itself exits 1 on a preemption: the
# run dir's `preempted` marker (written by rank 0 with the saved step) tells the two apart: on nodes other
# than rank 0's, only when the run dir is on a shared file system (it must be, for checkpoints, anyway).
set -uo pipefail

VLP_HOME=${VLP_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
CONFIG=${CONFIG:-${1:-}}
[ -n "${1:-}" ] && [ "$1" = "$CONFIG" ] && shift
if [ -z "$CONFIG" ] || [ -z "${NNODES:-}" ] || [ -z "${RDZV_ENDPOINT:-}" ]; then
    echo "usage: NNODES=N RDZV_ENDPOINT=host:port [NPROC_PER_NODE=8] $0 CONFIG [KEY=VALUE ...]" >&2
    exit 2
fi
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$VLP_HOME${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "${NPROC_PER_NODE:-0}" -gt 0 ] || NPROC_PER_NODE=1
fi
if [ -z "${RUN_DIR:-}" ]; then
    RUN_DIR=$("$PYTHON" -c 'import sys
from vlpretrain.config import load_config
print(load_config(sys.argv[1], sys.argv[2:]).train.run_dir)' "$CONFIG" "$@") || exit 2
fi
mkdir -p "$RUN_DIR/logs"
export VLP_RUN_DIR=$RUN_DIR
source "$VLP_HOME/launch/cluster_env.sh"

SIGNALS=()  # handle and forward the preemption signals instead of dying of them (torch >= 2.8)
if "$PYTHON" -m torch.distributed.run --help 2>/dev/null | grep -q -- --signals-to-handle; then
    SIGNALS=(--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2)
fi
RESUME=${RESUME-auto}
RESUME_ARGS=()
[ -n "$RESUME" ] && RESUME_ARGS=(--resume "$RESUME")
STAMP=$(mktemp "$RUN_DIR/logs/.start.XXXXXX")  # a `preempted` marker newer than this is this run's
"$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-vlpretrain}" \
    --max-restarts="${MAX_RESTARTS:-2}" ${LOCAL_ADDR:+--local-addr="$LOCAL_ADDR"} "${SIGNALS[@]}" \
    ${TORCHRUN_ARGS:-} -m vlpretrain train --config "$CONFIG" "${RESUME_ARGS[@]}" \
    --set "train.run_dir=$RUN_DIR" "$@"
rc=$?
if [ "$RUN_DIR/preempted" -nt "$STAMP" ]; then
    echo "torchrun_multinode: preempted ($(cat "$RUN_DIR/preempted")): start it again to resume" >&2
    rc=42
fi
rm -f "$STAMP"
exit "$rc"
