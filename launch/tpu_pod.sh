#!/usr/bin/env bash
# EMIT training on a Cloud TPU VM slice: create it, copy the repository to every worker and
# install it, run the same training command on every worker at once, stop it, delete the slice.
#
#   launch/tpu_pod.sh [options] create|setup|run|stop|delete [-- TRAIN_ARGS...]
#
# On a TPU slice JAX finds the workers itself: emit_jax.parallel.initialize calls
# jax.distributed.initialize() without arguments when TPU_NAME (or TPU_WORKER_HOSTNAMES) is set,
# which `run` does. Every worker runs the same command; process 0 writes logs and exports.
#
# Slices: v5p-8 is 4 chips (JAX sees 4 devices) on 1 host; v5p-16 is 8 chips on 2 hosts; v5p-32
# is 16 chips on 4 hosts (4 workers, 4 JAX processes). The number in the name counts TensorCores.
#
# Example (see launch/README.md):
#   export TPU_NAME=emit-v5p TPU_ZONE=us-east5-a TPU_TYPE=v5p-8
#   launch/tpu_pod.sh create && launch/tpu_pod.sh setup
#   launch/tpu_pod.sh run -- --config.init_from=/path/on/workers/sft/model --config.data.source=...
#   launch/tpu_pod.sh delete
# DRY_RUN=1 (or --dry-run) prints the gcloud commands instead of running them.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: launch/tpu_pod.sh [options] create|setup|run|stop|delete [-- TRAIN_ARGS...]

  create   gcloud compute tpus tpu-vm create (accelerator type, runtime version)
  setup    copy this working tree (or clone REPO_URL) to every worker, make a virtual
           environment there and pip install -e . "jax[tpu]"
  run      run python -m emit_jax.train on every worker (--worker=all) and wait; TRAIN_ARGS
           are appended to the command
  stop     SIGTERM to the training process that `run` started on every worker
  delete   gcloud compute tpus tpu-vm delete

options (each also an environment variable):
  --name NAME       TPU_NAME      the TPU VM / slice name (required)
  --zone ZONE       TPU_ZONE      its zone (required), e.g. us-east5-a for v5p
  --type TYPE       TPU_TYPE      accelerator type (default v5p-8: 4 chips, 1 host;
                                  v5p-32: 16 chips, 4 hosts)
  --version V       TPU_VERSION   runtime version (default from the type: v5p -> v2-alpha-tpuv5,
                                  v5litepod -> v2-alpha-tpuv5-lite, v6e -> v2-alpha-tpuv6e,
                                  v4 -> tpu-ubuntu2204-base)
  --project P       TPU_PROJECT   Google Cloud project (default: gcloud's configured one;
                                  with neither, it stops before any gcloud command)
  --dry-run         DRY_RUN=1     print the commands instead of running them
  -h, --help

environment for setup / run:
  CONFIG        config file (default configs/internvl3_8b_grpo.py)
  WORKDIR       run directory on the workers (default runs/<config name>[-<variant>], relative to
                REMOTE_DIR); with several hosts it must be a shared file system
  EXTRA_ARGS    more flags for emit_jax.train, split on spaces (TRAIN_ARGS after -- too)
  MESH_DATA     size of the mesh's data axis (default 1: fsdp=-1 spans the whole slice)
  MESH_FSDP, MESH_TENSOR   the fsdp and tensor axes (default -1 and 1); set them here, not in
                EXTRA_ARGS: emit_jax.train refuses a flag given twice with two values
  REMOTE_DIR    where the repository goes on each worker (default emit_jax, under $HOME)
  REMOTE_VENV   virtual environment inside REMOTE_DIR (default .venv; empty: none)
  TPU_PYTHON    interpreter that creates the virtual environment (default python3)
  JAX_TPU       the JAX requirement installed by setup (default jax[tpu])
  REPO_URL      setup clones this repository (REPO_REF: branch / tag) instead of copying
                the local working tree
  CREATE_ARGS   more flags for create, split on spaces (e.g. --spot)
  SSH_ARGS      more flags for every tpu-vm ssh / scp (e.g. --tunnel-through-iap)
EOF
}

die() {
    echo "tpu_pod.sh: $*" >&2
    exit 2
}

action=""
train_args=()
dry_run=${DRY_RUN:-0}
while (($# > 0)); do
    case "$1" in
        --name) (($# >= 2)) || die "$1 needs a value"; TPU_NAME=$2; shift 2 ;;
        --zone) (($# >= 2)) || die "$1 needs a value"; TPU_ZONE=$2; shift 2 ;;
        --type) (($# >= 2)) || die "$1 needs a value"; TPU_TYPE=$2; shift 2 ;;
        --version) (($# >= 2)) || die "$1 needs a value"; TPU_VERSION=$2; shift 2 ;;
        --project) (($# >= 2)) || die "$1 needs a value"; TPU_PROJECT=$2; shift 2 ;;
        --name=* | --zone=* | --type=* | --version=* | --project=*)
            key=${1%%=*}
            set -- "$key" "${1#*=}" "${@:2}"
            ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; train_args=("$@"); break ;;
        create | setup | run | stop | delete)
            [[ -z $action ]] || die "one action at a time ('$action' and '$1')"
            action=$1
            shift
            ;;
        *) die "unknown argument '$1' (launch/tpu_pod.sh -h for usage)" ;;
    esac
done
[[ -n $action ]] || { usage >&2; exit 2; }
[[ $dry_run == 0 || $dry_run == 1 ]] || die "DRY_RUN is 0 or 1, got '$dry_run'"

name=${TPU_NAME:-}
zone=${TPU_ZONE:-}
[[ -n $name ]] || die "no TPU name (--name NAME or TPU_NAME=...)"
[[ -n $zone ]] || die "no zone (--zone ZONE or TPU_ZONE=...)"
# Cloud TPU's own rules, checked before any command (before: a name of ' ' reached gcloud)
[[ $name =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    die "TPU name '$name': lowercase letters, digits and hyphens, starting with a letter (at most 63)"
[[ $zone =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "zone '$zone' is not a zone name (like us-central2-b)"
tpu_type=${TPU_TYPE:-v5p-8}
# GENERATION-SIZE with a size of at least 1; v4 and v5p count TensorCores, two per chip
# (twenty-second probe: v5p-0 and v5p-7 reached gcloud's create)
[[ $tpu_type =~ ^(v[0-9]+[a-z]*|v5litepod)-([1-9][0-9]*)$ ]] ||
    die "TPU type '$tpu_type' is not an accelerator type (like v5p-8, v5litepod-16, v6e-8)"
if [[ $tpu_type =~ ^(v4|v5p)-([0-9]+)$ ]] && ((10#${BASH_REMATCH[2]} % 2)); then
    die "TPU type '$tpu_type': ${BASH_REMATCH[1]} sizes count TensorCores, two per chip (an even number, like ${BASH_REMATCH[1]}-8)"
fi
if [[ -z ${TPU_VERSION:-} ]]; then
    case "$tpu_type" in
        v5p-*) TPU_VERSION=v2-alpha-tpuv5 ;;
        v5litepod-* | v5e-*) TPU_VERSION=v2-alpha-tpuv5-lite ;;
        v6e-*) TPU_VERSION=v2-alpha-tpuv6e ;;
        v4-*) TPU_VERSION=tpu-ubuntu2204-base ;;
        *) die "no default runtime version for $tpu_type; pass --version (gcloud compute tpus tpu-vm versions list --zone=$zone)" ;;
    esac
fi
project_flag=()
if [[ -n ${TPU_PROJECT:-} ]]; then project_flag=(--project="$TPU_PROJECT"); fi
if ((dry_run == 0)); then  # checked before the first gcloud command, not by its failure
    command -v gcloud >/dev/null ||
        die "gcloud not found on PATH: install the Google Cloud CLI, or see the commands with --dry-run"
    if [[ -z ${TPU_PROJECT:-} && -z $(gcloud config get-value project 2>/dev/null) ]]; then
        die "no Google Cloud project: pass --project P (or TPU_PROJECT=...), or run 'gcloud config set project P'"
    fi
fi
read -r -a ssh_extra <<<"${SSH_ARGS:-}"

remote_dir=${REMOTE_DIR:-emit_jax}
remote_venv=${REMOTE_VENV-.venv}
config=${CONFIG:-configs/internvl3_8b_grpo.py}
variant=${config#"${config%%:*}"}  # ":smoke" or "" (runs/<name>-<variant>, as emit_jax.train)
workdir=${WORKDIR:-runs/$(basename "${config%%:*}" .py)${variant:+-${variant#:}}}
mesh_data=${MESH_DATA:-1}
mesh_fsdp=${MESH_FSDP:--1}
mesh_tensor=${MESH_TENSOR:-1}
# checked here, not first on the rented workers (before: a dry run printed them as given)
for axis in DATA:$mesh_data FSDP:$mesh_fsdp TENSOR:$mesh_tensor; do
    [[ ${axis#*:} =~ ^(-1|[1-9][0-9]*)$ ]] ||
        die "MESH_${axis%%:*}: '${axis#*:}' is no axis size (a positive whole number, or -1 for the rest)"
done
config_file=${config%%:*}
if [[ $config_file == *.py && ! -f $config_file && ! -f $(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/$config_file ]]; then
    die "CONFIG: no such config file: $config_file (relative to the repository root)"
fi
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# a command line as it can be pasted into a shell
show() {
    local a out=()
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
            out+=("$a")
        elif [[ $a =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then  # --flag='value'
            local v=${BASH_REMATCH[2]}
            out+=("${BASH_REMATCH[1]}'${v//\'/\'\\\'\'}'")
        else
            out+=("'${a//\'/\'\\\'\'}'")
        fi
    done
    echo "${out[*]}"
}

# run a command, or print it under --dry-run
do_cmd() {
    if ((dry_run)); then
        show "$@"
    else
        echo "+ $(show "$@")" >&2
        "$@"
    fi
}

ssh_all() {  # ssh_all REMOTE_COMMAND: run it on every worker at once
    do_cmd gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" "${project_flag[@]}" \
        --worker=all "${ssh_extra[@]}" --command="$1"
}

q() { printf '%q' "$1"; }  # quote one word for the workers' bash

activate=""
if [[ -n $remote_venv ]]; then activate=". $(q "$remote_venv")/bin/activate && "; fi

case "$action" in
    create)
        read -r -a create_extra <<<"${CREATE_ARGS:-}"
        do_cmd gcloud compute tpus tpu-vm create "$name" --zone="$zone" "${project_flag[@]}" \
            --accelerator-type="$tpu_type" --version="$TPU_VERSION" "${create_extra[@]}"
        ;;

    setup)
        if [[ -n ${REPO_URL:-} ]]; then
            ref=""
            if [[ -n ${REPO_REF:-} ]]; then ref=" && git checkout $(q "$REPO_REF")"; fi
            fetch="if [ -d $(q "$remote_dir")/.git ]; then git -C $(q "$remote_dir") pull --ff-only;"
            fetch+=" else git clone $(q "$REPO_URL") $(q "$remote_dir"); fi"
            fetch+=" && cd $(q "$remote_dir")$ref"
        else
            # this working tree (uncommitted changes included), without runs, logs and venvs
            tarball="${TMPDIR:-/tmp}/emit_jax_src.$$.tgz"
            if ((dry_run == 0)); then trap 'rm -f "$tarball"' EXIT; fi
            do_cmd tar -czf "$tarball" -C "$repo_root" --exclude=./.git --exclude=./runs \
                --exclude=./launch_logs --exclude=./.venv --exclude=./venv \
                --exclude='*.egg-info' --exclude=__pycache__ .
            do_cmd gcloud compute tpus tpu-vm scp "$tarball" "$name:emit_jax_src.tgz" \
                --zone="$zone" "${project_flag[@]}" --worker=all "${ssh_extra[@]}"
            fetch="mkdir -p $(q "$remote_dir") && tar -xzf emit_jax_src.tgz -C $(q "$remote_dir")"
            fetch+=" && rm emit_jax_src.tgz && cd $(q "$remote_dir")"
        fi
        py=$(q "${TPU_PYTHON:-python3}")
        install="$fetch && $py --version"
        install+=" && { $py -c \"import sys; sys.exit(sys.version_info < (3, 11))\""
        install+=" || echo \"warning: recent jax releases need Python >= 3.11; set TPU_PYTHON\"; }"
        if [[ -n $remote_venv ]]; then
            install+=" && $py -m venv $(q "$remote_venv") && $activate"
        else
            install+=" && "
        fi
        install+="python -m pip install -U pip && python -m pip install -e . $(q "${JAX_TPU:-jax[tpu]}")"
        ssh_all "$install"
        ;;

    run)
        read -r -a extra <<<"${EXTRA_ARGS:-}"
        extra+=("${train_args[@]}")
        for a in "${extra[@]}"; do  # what the script sets itself: train would refuse it twice
            case "$a" in  # on the workers, after the slice was made (seventeenth probe TP1)
                --config | --config=* | --workdir | --workdir=*)
                    die "${a%%=*} in TRAIN_ARGS/EXTRA_ARGS: set CONFIG=... / WORKDIR=... instead (the script passes them)" ;;
                --config.mesh.* | --config.mesh.*=*)
                    die "${a%%=*} in TRAIN_ARGS/EXTRA_ARGS: set MESH_DATA / MESH_FSDP / MESH_TENSOR instead (the script passes them)" ;;
            esac
        done
        train=(python -m emit_jax.train --config="$config" --workdir="$workdir"
            --config.mesh.data="$mesh_data" --config.mesh.fsdp="$mesh_fsdp" --config.mesh.tensor="$mesh_tensor"
            "${extra[@]}")
        words=""
        for w in "${train[@]}"; do words+="$(q "$w") "; done
        # TPU_NAME makes emit_jax.parallel.initialize call jax.distributed.initialize();
        # the pid file is for `stop` (exec keeps the shell's pid)
        # shellcheck disable=SC2016  # $$ and $(hostname) expand on the workers
        pidfile='.train.$(hostname).pid'
        ssh_all "cd $(q "$remote_dir") && ${activate}export TPU_NAME=$(q "$name") && echo \$\$ > $pidfile && exec ${words% }"
        ;;

    stop)
        # shellcheck disable=SC2016  # expands on the workers
        ssh_all "cd $(q "$remote_dir")"' && f=.train.$(hostname).pid && if [ -f "$f" ]; then p=$(cat "$f"); if grep -q emit_jax.train "/proc/$p/cmdline" 2>/dev/null; then kill -TERM "$p" && echo "$(hostname): SIGTERM to $p"; fi; rm -f "$f"; fi'
        ;;

    delete)
        do_cmd gcloud compute tpus tpu-vm delete "$name" --zone="$zone" "${project_flag[@]}" --quiet
        ;;
esac
