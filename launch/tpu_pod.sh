#!/usr/bin/env bash
# Runs bgpo_jax training on a Cloud TPU VM slice: create the slice, copy and install the repo on
# every TPU host, start the trainer on all hosts at once (one process per host; they join through
# jax.distributed), stream the log of one host, then delete the slice.
#
#   launch/tpu_pod.sh --zone=us-east5-a --workdir=gs://MY_BUCKET/bgpo/math-run1 \
#       --config=configs/math.py -- --config.mesh.shape='(1,-1,1)'
#
# Re-running the same command resumes from the newest checkpoint in --workdir. Ctrl-C asks whether
# to stop the trainer (it saves a checkpoint first), leave it running, or tear the slice down.
# --dry-run prints every command ("+ " lines) and runs none; it needs no gcloud.
# Details: launch/README.md and docs/multihost.md.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "${SCRIPT_DIR}/.." && pwd)

# TPU names: lowercase letters, digits and hyphens, starting with a letter.
default_name() {
  local user
  user=$(printf '%s' "${USER:-user}" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9-' '-' | sed 's/-*$//')
  printf 'bgpo-%s' "${user:-user}"
}

NAME=${BGPO_TPU_NAME:-$(default_name)}
ZONE=${BGPO_TPU_ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}
PROJECT=${BGPO_TPU_PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}
ACCEL=${BGPO_TPU_TYPE:-v5p-64}
RUNTIME=${BGPO_TPU_RUNTIME:-}
CAPACITY=${BGPO_TPU_CAPACITY:-}  # "", spot or preemptible
CONFIG=${BGPO_CONFIG:-configs/math.py}
WORKDIR=${BGPO_WORKDIR:-}
EXTRA=${BGPO_EXTRA:-}
SETUP=${BGPO_TPU_SETUP:-}
GIT_URL=${BGPO_GIT_URL:-}
GIT_REF=${BGPO_GIT_REF:-main}
TFDS_DIR=${BGPO_TFDS_DIR:-/tmp/bgpo_tfds}
LOG_WORKER=${BGPO_LOG_WORKER:-0}
PYTHON=${BGPO_PYTHON:-python3}
ACTION=all  # all / teardown / logs / stop
KEEP=0
DRY_RUN=0
SKIP_CREATE=0
SKIP_INSTALL=0
ENV_VARS=()
CREATE_ARGS=()
TRAINER_ARGS=()

usage() {
  cat <<EOF
Usage: launch/tpu_pod.sh --zone=ZONE --workdir=gs://BUCKET/PATH [options] [-- trainer flags]

Creates a TPU VM slice, installs this repo on every host, runs
  ${PYTHON} -m bgpo_jax.main --config=CONFIG --workdir=WORKDIR --config.distributed=on [extra]
on all hosts at once, streams one host's log, and deletes the slice when training ends.

Slice (flag, env default):
  --name=NAME               TPU VM name (BGPO_TPU_NAME; default: ${NAME})
  --zone=ZONE               zone, required (BGPO_TPU_ZONE or CLOUDSDK_COMPUTE_ZONE)
  --project=PROJECT         project (BGPO_TPU_PROJECT or CLOUDSDK_CORE_PROJECT; default: gcloud's)
  --accelerator-type=TYPE   e.g. v5p-64, v5litepod-32, v4-32, v6e-64 (BGPO_TPU_TYPE; default: ${ACCEL})
  --runtime-version=VER     TPU software version (BGPO_TPU_RUNTIME; default: picked from the type)
  --spot | --preemptible    cheaper capacity that can be reclaimed (BGPO_TPU_CAPACITY=spot|preemptible)
  --create-arg=ARG          extra flag for 'gcloud compute tpus tpu-vm create' (repeatable),
                            e.g. --create-arg=--network=my-net
  --skip-create             use an existing slice named NAME

Code and data:
  --git-url=URL             clone this repository on the hosts (BGPO_GIT_URL) instead of copying
                            the local working tree (the default: a tarball of ${REPO_ROOT})
  --git-ref=REF             branch or tag to clone (BGPO_GIT_REF; default: ${GIT_REF})
  --skip-install            the hosts already have the code and 'pip install -e .[tpu]'
  --setup=CMD               shell command run on every host after install, e.g. to stage data or
                            weights locally (BGPO_TPU_SETUP):
                            --setup='gcloud storage cp -r gs://B/LLaDA-8B-Instruct /tmp/'

Training:
  --config=FILE             config file, relative to the repo root (BGPO_CONFIG; default: ${CONFIG})
  --workdir=gs://...        run directory, required (BGPO_WORKDIR): checkpoints and metrics; the same
                            command resumes from its newest checkpoint
  --extra="ARGS"            trainer flags, split on spaces (BGPO_EXTRA), e.g.
                            --extra="--config.total_steps=200 --config.rl.num_mc_samples=8";
                            arguments after '--' are passed verbatim (use them for values with spaces)
  --tfds-dir=DIR            TFDS build folder on each host's local disk (BGPO_TFDS_DIR; default:
                            ${TFDS_DIR}); every host builds its own copy, so hosts never race
  --env=KEY=VALUE           environment variable for the trainer (repeatable)
  --python=PY               interpreter on the hosts (BGPO_PYTHON; default: ${PYTHON})
  --log-worker=N|all        whose log to stream (BGPO_LOG_WORKER; default: ${LOG_WORKER})

Lifecycle:
  --keep                    do not delete the slice at the end
  --teardown-only           delete the slice NAME and exit
  --logs-only               re-attach: stream the log of a running trainer, then tear down as usual
  --stop-only               send SIGTERM to the trainers (they finish the step, save, exit 0), wait
  --dry-run                 print every command ("+ " lines) and run none; needs no gcloud
  -h, --help                this help
EOF
}

die() {
  echo "tpu_pod.sh: error: $*" >&2
  exit 2
}

# Quotes one word for a POSIX shell only when it needs it (readable --dry-run output).
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

# Runs a command, or prints it under --dry-run.
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
    --name|--zone|--project|--accelerator-type|--runtime-version|--config|--workdir|--extra|\
    --setup|--git-url|--git-ref|--tfds-dir|--env|--create-arg|--python|--log-worker)
      if [[ "${arg}" != *=* ]]; then
        need_value "${key}" "${1:-}"
        val=$1
        shift
      fi ;;
  esac
  case "${key}" in
    --name) NAME=${val} ;;
    --zone) ZONE=${val} ;;
    --project) PROJECT=${val} ;;
    --accelerator-type) ACCEL=${val} ;;
    --runtime-version) RUNTIME=${val} ;;
    --config) CONFIG=${val} ;;
    --workdir) WORKDIR=${val} ;;
    --extra) EXTRA="${EXTRA:+${EXTRA} }${val}" ;;
    --setup) SETUP=${val} ;;
    --git-url) GIT_URL=${val} ;;
    --git-ref) GIT_REF=${val} ;;
    --tfds-dir) TFDS_DIR=${val} ;;
    --env) [[ "${val}" == *=* ]] || die "--env ${val}: expected KEY=VALUE"; ENV_VARS+=("${val}") ;;
    --create-arg) CREATE_ARGS+=("${val}") ;;
    --python) PYTHON=${val} ;;
    --log-worker) LOG_WORKER=${val} ;;
    --spot) CAPACITY=spot ;;
    --preemptible) CAPACITY=preemptible ;;
    --skip-create) SKIP_CREATE=1 ;;
    --skip-install) SKIP_INSTALL=1 ;;
    --keep) KEEP=1 ;;
    --teardown-only) ACTION=teardown ;;
    --logs-only) ACTION=logs ;;
    --stop-only) ACTION=stop ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option ${arg}; see --help" ;;
  esac
done

# ------------------------------------------------------------------------------------ checks

[[ -n "${ZONE}" ]] || die "--zone is required: the zone of the slice, e.g. --zone=us-east5-a for v5p (or set BGPO_TPU_ZONE)"
[[ "${NAME}" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '${NAME}' is not a valid TPU name: use lowercase letters, digits and hyphens, starting with a letter"
case "${CAPACITY}" in ""|spot|preemptible) ;; *) die "BGPO_TPU_CAPACITY '${CAPACITY}' is unknown; use spot, preemptible or leave it empty" ;; esac
[[ "${LOG_WORKER}" =~ ^([0-9]+|all)$ ]] || die "--log-worker '${LOG_WORKER}' must be a worker number or 'all'"

if [[ "${ACTION}" == all ]]; then
  [[ -n "${WORKDIR}" ]] || die "--workdir is required: a gs:// folder every TPU host can write, e.g. --workdir=gs://MY_BUCKET/bgpo/math-run1 (or set BGPO_WORKDIR)"
  [[ "${WORKDIR}" == gs://?* ]] || die "--workdir '${WORKDIR}' must be a gs:// path: all hosts write one Orbax checkpoint there, and the hosts' disks are deleted at teardown"
  WORKDIR=${WORKDIR%/}
  [[ "${CONFIG}" != /* ]] || die "--config '${CONFIG}' must be relative to the repo root (e.g. configs/math.py): the hosts have their own copy of the repo"
  if [[ -z "${GIT_URL}" && ! -f "${REPO_ROOT}/${CONFIG}" ]]; then
    die "--config '${CONFIG}' not found under ${REPO_ROOT}; use one of: $(cd "${REPO_ROOT}" && echo configs/*.py)"
  fi
  if [[ -z "${RUNTIME}" && "${SKIP_CREATE}" == 0 ]]; then
    case "${ACCEL}" in
      v4-*) RUNTIME=tpu-ubuntu2204-base ;;
      v5litepod-*|v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
      v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
      v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
      *) die "no default runtime for --accelerator-type '${ACCEL}'; pass --runtime-version (see 'gcloud compute tpus tpu-vm versions list --zone=${ZONE}')" ;;
    esac
  fi
fi

if [[ "${DRY_RUN}" == 0 ]] && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found: install the Google Cloud SDK (https://cloud.google.com/sdk/docs/install), or use --dry-run to see the commands"
fi

LOC=(--zone="${ZONE}")
[[ -z "${PROJECT}" ]] || LOC+=(--project="${PROJECT}")

# On the hosts: the repo in ~/bgpo_jax; pid, log and exit code of the trainer in ~/bgpo_run.
# shellcheck disable=SC2088  # the tilde is expanded by the hosts' shells, not here
REMOTE_REPO='~/bgpo_jax'
# shellcheck disable=SC2088
RUN_DIR='~/bgpo_run'

tpu_ssh() {  # tpu_ssh WORKER COMMAND
  run gcloud compute tpus tpu-vm ssh "${NAME}" "${LOC[@]}" --worker="$1" --command="$2"
}

# ------------------------------------------------------------------------------------ phases

create_slice() {
  local args=(gcloud compute tpus tpu-vm create "${NAME}" "${LOC[@]}" --accelerator-type="${ACCEL}"
              --version="${RUNTIME}" --scopes=https://www.googleapis.com/auth/cloud-platform)
  [[ -z "${CAPACITY}" ]] || args+=("--${CAPACITY}")
  run "${args[@]}" ${CREATE_ARGS[@]+"${CREATE_ARGS[@]}"}
}

install_code() {
  local pip="${PYTHON} -m pip install --quiet"
  # gcsfs: Orbax and TFDS reach gs:// through etils.epath, which needs it (no TensorFlow here).
  local install="cd ${REMOTE_REPO} && ${pip} --upgrade pip && ${pip} -e '.[tpu]' gcsfs"
  if [[ -n "${GIT_URL}" ]]; then
    local url ref
    url=$(shquote "${GIT_URL}")
    ref=$(shquote "${GIT_REF}")
    tpu_ssh all "if [ -d ${REMOTE_REPO}/.git ]; then git -C ${REMOTE_REPO} fetch --depth 1 ${url} ${ref} && git -C ${REMOTE_REPO} checkout --force FETCH_HEAD; else git clone --depth 1 --branch ${ref} ${url} ${REMOTE_REPO}; fi && ${install}"
  else
    # The working tree as it is (uncommitted edits included), without environments and VCS data.
    local tarball="${TMPDIR:-/tmp}/bgpo_jax_${NAME}.tgz"
    run tar -czf "${tarball}" --exclude=./.git --exclude=./.venv --exclude='*/__pycache__' \
      --exclude=./build --exclude='./*.egg-info' -C "${REPO_ROOT}" .
    run gcloud compute tpus tpu-vm scp "${tarball}" "${NAME}:bgpo_jax.tgz" "${LOC[@]}" --worker=all
    # Extract over the old tree (no rm -rf): a previous run may keep local metrics there.
    tpu_ssh all "mkdir -p ${REMOTE_REPO} && tar -xzf ~/bgpo_jax.tgz -C ${REMOTE_REPO} && ${install}"
  fi
}

trainer_command() {
  local args=("${PYTHON}" -m bgpo_jax.main --config="${CONFIG}" --workdir="${WORKDIR}"
              --config.distributed=on --config.task.tfds_dir="${TFDS_DIR}")
  local extra=()
  [[ -z "${EXTRA}" ]] || read -r -a extra <<<"${EXTRA}"
  args+=(${extra[@]+"${extra[@]}"} ${TRAINER_ARGS[@]+"${TRAINER_ARGS[@]}"})
  printf '%s' "$(join_quoted env PYTHONUNBUFFERED=1 ${ENV_VARS[@]+"${ENV_VARS[@]}"} "${args[@]}")"
}

start_trainers() {
  # Detached (setsid nohup), so the run survives a lost connection; the wrapper shell records its
  # pid (the trainer is its child, which --stop-only signals) and the trainer's exit code.
  local cmd inner
  cmd=$(trainer_command)
  inner="echo \$\$ > ${RUN_DIR}/pid; ${cmd}; echo \$? > ${RUN_DIR}/rc"
  tpu_ssh all "mkdir -p ${RUN_DIR} && cd ${REMOTE_REPO} && if [ -f ${RUN_DIR}/pid ] && kill -0 \"\$(cat ${RUN_DIR}/pid)\" 2>/dev/null; then echo \"a trainer is already running on \$(hostname); use --logs-only or --stop-only\" >&2; exit 1; fi; rm -f ${RUN_DIR}/rc ${RUN_DIR}/pid; nohup setsid bash -c $(shquote "${inner}") > ${RUN_DIR}/train.log 2>&1 < /dev/null &"
}

stream_logs() {
  # Ends when the trainer exits; the ssh exit status is that host's trainer exit code.
  tpu_ssh "${LOG_WORKER}" "for i in \$(seq 50); do [ -f ${RUN_DIR}/pid ] && break; sleep 0.2; done; tail -n +1 -F -s 0.5 --pid=\"\$(cat ${RUN_DIR}/pid)\" ${RUN_DIR}/train.log 2>/dev/null; exit \"\$(cat ${RUN_DIR}/rc 2>/dev/null || echo 1)\""
}

stop_trainers() {
  # SIGTERM: each trainer finishes its step, saves a checkpoint to the workdir and exits 0.
  tpu_ssh all "if [ -f ${RUN_DIR}/pid ]; then pkill -TERM -P \"\$(cat ${RUN_DIR}/pid)\" || true; fi"
}

collect_outputs() {
  # Before the slice (and its disks) goes: every host's log to WORKDIR/logs/. Metrics,
  # TensorBoard events, plots and checkpoints are already in the gs:// workdir (the trainer
  # writes every path through etils.epath).
  [[ -n "${WORKDIR}" ]] || return 0
  local dest
  dest=$(shquote "${WORKDIR%/}")
  tpu_ssh all "if [ -f ${RUN_DIR}/train.log ]; then gcloud storage cp ${RUN_DIR}/train.log ${dest}/logs/train-\$(hostname).log; fi" || true
}

teardown() {
  run gcloud compute tpus tpu-vm delete "${NAME}" "${LOC[@]}" --quiet
}

print_later() {
  echo "the slice ${NAME} is still up (billed while it exists). Later:" >&2
  echo "  re-attach:  $0 --name=${NAME} --zone=${ZONE}${PROJECT:+ --project=${PROJECT}} --workdir=${WORKDIR:-gs://...} --logs-only" >&2
  echo "  tear down:  $0 --name=${NAME} --zone=${ZONE}${PROJECT:+ --project=${PROJECT}} --teardown-only" >&2
}

finish() {  # finish EXIT_CODE: collect metrics, tear down unless --keep, exit
  collect_outputs
  if [[ "${KEEP}" == 1 ]]; then
    print_later
  else
    teardown
  fi
  exit "$1"
}

# ------------------------------------------------------------------------------------ Ctrl-C

PHASE=setup
# shellcheck disable=SC2317  # invoked by the trap
on_interrupt() {
  trap '' INT TERM
  echo >&2
  local answer=""
  if [[ -t 0 && "${DRY_RUN}" == 0 ]]; then
    if [[ "${PHASE}" == running ]]; then
      read -r -p "interrupted: [s]top training (checkpoint, then tear down), [d]etach (leave it running), [t]ear down now? [s/d/t] " answer || true
    else
      read -r -p "interrupted: tear down ${NAME} now? [y/N] " answer || true
      [[ "${answer}" == [yY]* ]] && answer=t || answer=d
    fi
  fi
  case "${answer}" in
    s|S)
      stop_trainers
      stream_logs || true
      finish 130 ;;
    t|T)
      collect_outputs
      teardown
      exit 130 ;;
    *)
      print_later
      exit 130 ;;
  esac
}

# ------------------------------------------------------------------------------------ main

case "${ACTION}" in
  teardown)
    teardown
    exit 0 ;;
  stop)
    stop_trainers
    stream_logs
    exit $? ;;
esac

trap on_interrupt INT TERM
if [[ "${ACTION}" == all ]]; then
  [[ "${SKIP_CREATE}" == 1 ]] || create_slice
  [[ "${SKIP_INSTALL}" == 1 ]] || install_code
  [[ -z "${SETUP}" ]] || tpu_ssh all "${SETUP}"
  start_trainers
fi
PHASE=running
rc=0
stream_logs || rc=$?
PHASE=finished
trap - INT TERM
if [[ "${rc}" != 0 ]]; then
  echo "tpu_pod.sh: the trainer on worker ${LOG_WORKER} exited with ${rc}" >&2
fi
finish "${rc}"
