#!/usr/bin/env bash
# Runs bgpo_jax training on several GPU nodes with SLURM: one trainer process per node (it drives
# all GPUs of its node), joined through jax.distributed.
#
#   launch/gpu_slurm.sh --nodes=4 --gpus-per-node=8 --partition=gpu --time=48:00:00 \
#       --workdir=/shared/$USER/bgpo/math-run1 --config=configs/math.py \
#       --extra="--config.init.checkpoint=/shared/models/LLaDA-8B-Instruct --config.task.data_dir=/shared/datasets"
#
# Outside an allocation it writes an sbatch script and submits it; inside one (salloc, or an
# sbatch script of your own) it starts the processes with srun directly. Re-submitting the same
# command resumes from the newest checkpoint in --workdir.
# --dry-run prints the sbatch script / job body and the commands ("+ " lines); it needs no SLURM.
# Details: launch/README.md and docs/multihost.md.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "${SCRIPT_DIR}/.." && pwd)

NODES=${BGPO_NODES:-2}
GPUS=${BGPO_GPUS_PER_NODE:-8}
CPUS=${BGPO_CPUS_PER_TASK:-}
PARTITION=${BGPO_PARTITION:-}
ACCOUNT=${BGPO_ACCOUNT:-}
TIME_LIMIT=${BGPO_TIME:-24:00:00}
JOB_NAME=${BGPO_JOB_NAME:-bgpo}
CONFIG=${BGPO_CONFIG:-configs/math.py}
WORKDIR=${BGPO_WORKDIR:-}
EXTRA=${BGPO_EXTRA:-}
PORT=${BGPO_COORDINATOR_PORT:-}
PYTHON=${BGPO_PYTHON:-python3}
VENV=${BGPO_VENV:-}
LOG_DIR=${BGPO_SLURM_LOG_DIR:-}
TFDS_DIR=${BGPO_TFDS_DIR:-/tmp/bgpo_tfds}
SIGNAL_LEAD=${BGPO_SIGNAL_LEAD:-600}
MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
REQUEUE=0
EXCLUSIVE=1
INSTALL=0
FORCE_SUBMIT=0
DRY_RUN=0
SBATCH_ARGS=()
TRAINER_ARGS=()

usage() {
  cat <<EOF
Usage: launch/gpu_slurm.sh --workdir=DIR [options] [-- trainer flags]

Outside an allocation: writes an sbatch script (into --log-dir) and submits it.
Inside one (SLURM_JOB_ID set; e.g. under salloc): runs the job body here. The body starts
  srun --ntasks-per-node=1 ${PYTHON} -m bgpo_jax.main --config=CONFIG --workdir=WORKDIR \
       --config.task.tfds_dir=TFDS_DIR [extra]
with JAX_COORDINATOR_ADDRESS = first node of the allocation, and JAX_LOCAL_DEVICE_IDS = all GPUs
of the node (jax.distributed takes the process id and count from SLURM_PROCID / SLURM_NTASKS).

Allocation (flag, env default):
  --nodes=N                 nodes = trainer processes (BGPO_NODES; default: ${NODES})
  --gpus-per-node=G         GPUs per node (BGPO_GPUS_PER_NODE; default: ${GPUS})
  --cpus-per-task=C         CPUs per node for the trainer and its reward sandbox (BGPO_CPUS_PER_TASK)
  --partition=P             (BGPO_PARTITION)
  --account=A               (BGPO_ACCOUNT)
  --time=HH:MM:SS           time limit (BGPO_TIME; default: ${TIME_LIMIT})
  --job-name=NAME           (BGPO_JOB_NAME; default: ${JOB_NAME})
  --signal-lead=SECONDS     SIGTERM the trainers this long before the time limit, so they finish
                            the step and save (BGPO_SIGNAL_LEAD; default: ${SIGNAL_LEAD}; 0 = off)
  --requeue                 let SLURM requeue the job after preemption (it then resumes)
  --no-exclusive            share nodes with other jobs (default: whole nodes)
  --sbatch-arg=ARG          extra sbatch option (repeatable), e.g. --sbatch-arg=--qos=high
                            or --sbatch-arg=--gres=gpu:8 on clusters without --gpus-per-node
  --log-dir=DIR             sbatch script and job logs (BGPO_SLURM_LOG_DIR; default: WORKDIR/slurm,
                            or ./slurm_logs for a gs:// workdir); must be on a shared filesystem
  --submit                  submit with sbatch even inside an allocation

Training:
  --config=FILE             config, relative to the repo root or absolute (BGPO_CONFIG; default: ${CONFIG})
  --workdir=DIR             run directory on a filesystem every node sees, or gs://...; required
                            (BGPO_WORKDIR). The same command resumes from its newest checkpoint.
  --extra="ARGS"            trainer flags, split on spaces (BGPO_EXTRA); arguments after '--' are
                            passed verbatim (use them for values with spaces)
  --tfds-dir=DIR            TFDS build folder on each node's local disk (BGPO_TFDS_DIR; default:
                            ${TFDS_DIR}); every node builds its own copy, so nodes never race
  --port=PORT               coordinator port (BGPO_COORDINATOR_PORT; default: from the job id)
  --python=PY               interpreter (BGPO_PYTHON; default: ${PYTHON})
  --venv=DIR                virtualenv to activate in the job (BGPO_VENV)
  --install                 first run: pip install -e '${REPO_ROOT}[cuda]' (here, before submitting)
  --dry-run                 print the sbatch script / job body and the commands; run nothing
  -h, --help                this help

Environment for the trainers: XLA_PYTHON_CLIENT_MEM_FRACTION (default ${MEM_FRACTION}) and XLA_FLAGS
are passed through; NCCL settings are listed (commented) in the job body.
EOF
}

die() {
  echo "gpu_slurm.sh: error: $*" >&2
  exit 2
}

# Quotes one word for a POSIX shell only when it needs it (readable output, safe to paste).
shquote() {
  local s=$1
  if [[ -n "${s}" && "${s}" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "${s}"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

join_quoted() {
  local out="" a
  for a in "$@"; do
    out+="${out:+ }$(shquote "${a}")"
  done
  printf '%s' "${out}"
}

run() {
  echo "+ $(join_quoted "$@")"
  if [[ "${DRY_RUN}" == 0 ]]; then
    "$@"
  fi
}

need_value() {
  [[ -n "${2:-}" ]] || die "$1 needs a value"
}

while [[ $# -gt 0 ]]; do
  arg=$1
  case "${arg}" in
    --*=*) key=${arg%%=*}; val=${arg#*=}; shift ;;
    --) shift; TRAINER_ARGS+=("$@"); break ;;
    *) key=${arg}; val=""; shift ;;
  esac
  case "${key}" in
    --nodes|--gpus-per-node|--cpus-per-task|--partition|--account|--time|--job-name|--config|\
    --workdir|--extra|--port|--python|--venv|--log-dir|--signal-lead|--sbatch-arg|--tfds-dir)
      if [[ "${arg}" != *=* ]]; then
        need_value "${key}" "${1:-}"
        val=$1
        shift
      fi ;;
  esac
  case "${key}" in
    --nodes) NODES=${val} ;;
    --gpus-per-node) GPUS=${val} ;;
    --cpus-per-task) CPUS=${val} ;;
    --partition) PARTITION=${val} ;;
    --account) ACCOUNT=${val} ;;
    --time) TIME_LIMIT=${val} ;;
    --job-name) JOB_NAME=${val} ;;
    --config) CONFIG=${val} ;;
    --workdir) WORKDIR=${val} ;;
    --extra) EXTRA="${EXTRA:+${EXTRA} }${val}" ;;
    --port) PORT=${val} ;;
    --tfds-dir) TFDS_DIR=${val} ;;
    --python) PYTHON=${val} ;;
    --venv) VENV=${val} ;;
    --log-dir) LOG_DIR=${val} ;;
    --signal-lead) SIGNAL_LEAD=${val} ;;
    --sbatch-arg) SBATCH_ARGS+=("${val}") ;;
    --requeue) REQUEUE=1 ;;
    --no-exclusive) EXCLUSIVE=0 ;;
    --install) INSTALL=1 ;;
    --submit) FORCE_SUBMIT=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option ${arg}; see --help" ;;
  esac
done

# ------------------------------------------------------------------------------------ checks

positive_int() {
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 '$2' must be a positive integer"
}
positive_int --nodes "${NODES}"
positive_int --gpus-per-node "${GPUS}"
[[ -z "${CPUS}" ]] || positive_int --cpus-per-task "${CPUS}"
[[ -z "${PORT}" ]] || positive_int --port "${PORT}"
[[ "${SIGNAL_LEAD}" =~ ^[0-9]+$ ]] || die "--signal-lead '${SIGNAL_LEAD}' must be a number of seconds (0 = off)"
[[ -n "${WORKDIR}" ]] || die "--workdir is required: a folder every node can reach (shared filesystem) or a gs:// path, e.g. --workdir=/shared/\$USER/bgpo/math-run1 (or set BGPO_WORKDIR)"
# The job runs in the repo root: make local paths absolute first.
[[ "${WORKDIR}" == /* || "${WORKDIR}" == *://* ]] || WORKDIR="${PWD}/${WORKDIR}"
WORKDIR=${WORKDIR%/}
if [[ "${CONFIG}" == /* ]]; then
  [[ -f "${CONFIG}" ]] || die "--config '${CONFIG}' does not exist"
else
  [[ -f "${REPO_ROOT}/${CONFIG}" ]] || die "--config '${CONFIG}' not found under ${REPO_ROOT}; use one of: $(cd "${REPO_ROOT}" && echo configs/*.py)"
fi
if [[ -z "${LOG_DIR}" ]]; then
  if [[ "${WORKDIR}" == *://* ]]; then LOG_DIR="${PWD}/slurm_logs"; else LOG_DIR="${WORKDIR}/slurm"; fi
fi
[[ "${LOG_DIR}" == /* ]] || LOG_DIR="${PWD}/${LOG_DIR}"

INSIDE=0
if [[ -n "${SLURM_JOB_ID:-}" && "${FORCE_SUBMIT}" == 0 ]]; then
  INSIDE=1
fi

if [[ "${DRY_RUN}" == 0 ]]; then
  if [[ "${INSIDE}" == 1 ]]; then
    for tool in srun scontrol; do
      command -v "${tool}" >/dev/null 2>&1 || die "${tool} not found inside allocation ${SLURM_JOB_ID}: is SLURM on the PATH here?"
    done
  else
    command -v sbatch >/dev/null 2>&1 || die "sbatch not found: run this on a SLURM login node, or use --dry-run to see the script"
  fi
fi

# ------------------------------------------------------------------------------------ job

trainer_command() {
  local extra=()
  [[ -z "${EXTRA}" ]] || read -r -a extra <<<"${EXTRA}"
  join_quoted "${PYTHON}" -m bgpo_jax.main --config="${CONFIG}" --workdir="${WORKDIR}" \
    --config.task.tfds_dir="${TFDS_DIR}" ${extra[@]+"${extra[@]}"} ${TRAINER_ARGS[@]+"${TRAINER_ARGS[@]}"}
}

# The commands every allocation runs (on its first node): coordinator, environment, srun.
job_body() {
  local venv_line="# (no --venv: ${PYTHON} from the PATH)" port_expr
  [[ -z "${VENV}" ]] || venv_line="source $(shquote "${VENV}/bin/activate")"
  # Default port: from the job id, in the range JAX's own SLURM detection uses, so two jobs that
  # share a node do not collide.
  # shellcheck disable=SC2016  # expanded in the job, not here
  port_expr=${PORT:-'$(( SLURM_JOB_ID % 4096 + 61440 ))'}
  cat <<EOF
set -euo pipefail
cd $(shquote "${REPO_ROOT}")
${venv_line}

# jax.distributed.initialize() (called by the trainer because JAX_COORDINATOR_ADDRESS is set)
# reads the process id and count from SLURM_PROCID / SLURM_NTASKS of each srun task. It would
# also guess the coordinator, but from SLURM_STEP_NODELIST by string parsing; scontrol is exact.
head_node=\$(scontrol show hostnames "\${SLURM_JOB_NODELIST}" | sed -n 1p)  # sed reads all input: no SIGPIPE under pipefail
export JAX_COORDINATOR_ADDRESS="\${head_node}:${port_expr}"
# One process per node drives all its GPUs. Without this JAX's SLURM detection would give each
# process only GPU SLURM_LOCALID (it assumes one process per GPU).
gpus=\${SLURM_GPUS_ON_NODE:-${GPUS}}
JAX_LOCAL_DEVICE_IDS=\$(seq -s, 0 \$(( gpus - 1 )))
export JAX_LOCAL_DEVICE_IDS

# XLA: most of the GPU for the 8B state and activations (JAX's default is 0.75); overlap
# collectives with compute.
export XLA_PYTHON_CLIENT_MEM_FRACTION=\${XLA_PYTHON_CLIENT_MEM_FRACTION:-${MEM_FRACTION}}
export XLA_FLAGS="\${XLA_FLAGS:---xla_gpu_enable_latency_hiding_scheduler=true}"
export PYTHONUNBUFFERED=1
# NCCL depends on the cluster's fabric; uncomment what yours needs:
# export NCCL_DEBUG=WARN              # INFO to debug hangs at the first collective
# export NCCL_SOCKET_IFNAME=ib0       # interface for NCCL's bootstrap sockets
# export NCCL_IB_HCA=mlx5             # InfiniBand adapters to use
# export NCCL_NET_GDR_LEVEL=PHB       # GPUDirect RDMA distance
# HTTP(S)_PROXY variables can stall jax.distributed.initialize; unset them if it times out.

echo "bgpo: \${SLURM_JOB_NUM_NODES} nodes x \${gpus} GPUs, coordinator \${JAX_COORDINATOR_ADDRESS}"
srun --nodes="\${SLURM_JOB_NUM_NODES}" --ntasks-per-node=1 --kill-on-bad-exit=1 \\
  \${SLURM_CPUS_PER_TASK:+--cpus-per-task="\${SLURM_CPUS_PER_TASK}"} \\
  $(trainer_command)
EOF
}

sbatch_script() {
  local a
  echo "#!/bin/bash"
  echo "#SBATCH --job-name=$(shquote "${JOB_NAME}")"
  echo "#SBATCH --nodes=${NODES}"
  echo "#SBATCH --ntasks-per-node=1"
  echo "#SBATCH --gpus-per-node=${GPUS}"
  [[ -z "${CPUS}" ]] || echo "#SBATCH --cpus-per-task=${CPUS}"
  [[ -z "${PARTITION}" ]] || echo "#SBATCH --partition=$(shquote "${PARTITION}")"
  [[ -z "${ACCOUNT}" ]] || echo "#SBATCH --account=$(shquote "${ACCOUNT}")"
  echo "#SBATCH --time=${TIME_LIMIT}"
  echo "#SBATCH --output=$(shquote "${LOG_DIR}/%x-%j.out")"
  [[ "${EXCLUSIVE}" == 0 ]] || echo "#SBATCH --exclusive"
  # SIGTERM to the srun tasks before the limit: the trainers finish the step and save.
  [[ "${SIGNAL_LEAD}" == 0 ]] || echo "#SBATCH --signal=TERM@${SIGNAL_LEAD}"
  [[ "${REQUEUE}" == 0 ]] || echo "#SBATCH --requeue"
  for a in ${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"}; do
    echo "#SBATCH $(shquote "${a}")"
  done
  echo
  job_body
}

# ------------------------------------------------------------------------------------ main

if [[ "${INSTALL}" == 1 ]]; then
  install_py=${PYTHON}
  [[ -z "${VENV}" ]] || install_py="${VENV}/bin/python"
  run "${install_py}" -m pip install -e "${REPO_ROOT}[cuda]"
fi

if [[ "${INSIDE}" == 1 ]]; then
  body=$(job_body)
  echo "# --- job body, run here inside allocation ${SLURM_JOB_ID} ---"
  printf '%s\n' "${body}"
  echo "# --- end of job body ---"
  echo "+ bash -c <job body above>"
  if [[ "${DRY_RUN}" == 0 ]]; then
    exec bash -c "${body}"
  fi
  exit 0
fi

script_file="${LOG_DIR}/${JOB_NAME}-$(date +%Y%m%d-%H%M%S).sbatch"
script=$(sbatch_script)
echo "# --- sbatch script ${script_file} ---"
printf '%s\n' "${script}"
echo "# --- end of sbatch script ---"
run mkdir -p "${LOG_DIR}"
if [[ "${DRY_RUN}" == 1 ]]; then
  echo "+ sbatch --parsable $(shquote "${script_file}")"
  exit 0
fi
printf '%s\n' "${script}" >"${script_file}"
echo "+ sbatch --parsable $(shquote "${script_file}")"
job_id=$(sbatch --parsable "${script_file}")
job_id=${job_id%%;*}
echo "submitted job ${job_id}"
echo "  log:    tail -f $(shquote "${LOG_DIR}/${JOB_NAME}-${job_id}.out")"
echo "  stop:   scancel --signal=TERM ${job_id}   (the trainers save a checkpoint, then exit)"
echo "  resume: run this same command again"
