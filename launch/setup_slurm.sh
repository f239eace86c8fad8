#!/usr/bin/env bash
# Install what the Slurm tests need (tests/test_slurm.py starts a two-node cluster on this machine):
# Debian's Slurm 22.05 and munge. Root only (apt); does nothing when the tools are already there.
# Used by .ci/run and by the test fixture; harmless to run by hand.
set -uo pipefail
need=()
for tool in slurmctld slurmd sbatch munged; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ ${#need[@]} -eq 0 ]; then echo "setup_slurm: slurm and munge already installed"; exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "setup_slurm: missing ${need[*]}; install slurmctld slurmd slurm-client munge (needs root + apt)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
rc=$?
[ $rc -eq 0 ] && echo "setup_slurm: installed $(sbatch --version) and munge" || echo "setup_slurm: apt-get failed ($rc)" >&2
exit $rc
