"""The launch scripts (launch/): syntax, local.sh's process handling, tpu_pod.sh's dry run and
the SLURM batch script under stub ``srun`` / ``scontrol``. No JAX, no multi-process training."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SCRIPTS = ["local.sh", "slurm_a100.sbatch", "tpu_pod.sh"]

PRINT_ENV = ("import os; print(os.environ['EMIT_PROCESS_ID'], os.environ['EMIT_NUM_PROCESSES'], "
             "os.environ['EMIT_COORDINATOR'], os.environ['XLA_FLAGS'])")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EMIT_", "SLURM_", "TPU_", "XLA_FLAGS", "CUDA_VISIBLE_DEVICES",
                                "MASTER_ADDR", "DRY_RUN", "JAX_PLATFORMS"))}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(args, env, timeout=60, cwd=ROOT):
    return subprocess.run([str(a) for a in args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax_and_executable(script):
    path = LAUNCH / script
    assert os.access(path, os.X_OK), f"{path} is not executable"
    r = _run(["bash", "-n", path], _env())
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
    r = _run(["shellcheck", "-s", "bash", LAUNCH / script], _env())
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------------- local.sh
def test_local_usage():
    r = _run([LAUNCH / "local.sh", "-h"], _env())
    assert r.returncode == 0 and "usage: launch/local.sh" in r.stdout
    r = _run([LAUNCH / "local.sh", "-n", "2"], _env())  # no command
    assert r.returncode == 2 and "no command" in r.stderr
    r = _run([LAUNCH / "local.sh", "-n", "two", "--", "true"], _env())
    assert r.returncode == 2


def test_local_log_dir_that_is_a_file_is_one_line(tmp_path):
    """Eighteenth probe W5: ``LOG_DIR=FILE`` ended with mkdir's own "File exists"."""
    (tmp_path / "afile").write_text("mine")
    r = _run([LAUNCH / "local.sh", "-n", "1", "--cpu", "--", "true"],
             _env(LOG_DIR=tmp_path / "afile"))
    assert r.returncode == 2 and r.stderr.splitlines()[0] == (
        f"local.sh: LOG_DIR {tmp_path / 'afile'}: cannot make the log folder there (a file in "
        "its place, or not writable)")
    assert (tmp_path / "afile").read_text() == "mine"


def test_local_keeps_an_earlier_runs_logs_one_run_back(tmp_path):
    """Twenty-seventh probe LA10: a ``proc_0.log`` already in LOG_DIR (a user's file, or the
    log of a failed run that "says why") was emptied by the next launch without a note; a link
    of that name was written through. It is kept as ``proc_0.prev.log``, and said."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "proc_0.log").write_text("my precious log\n")
    (tmp_path / "target").write_text("not a log\n")
    (logs / "proc_1.log").symlink_to(tmp_path / "target")
    r = _run([LAUNCH / "local.sh", "-n", 2, "--cpu", "--", "true"], _env(LOG_DIR=logs),
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (f"local.sh: the earlier proc_0.log proc_1.log in {logs} kept as proc_*.prev.log"
            in r.stderr), r.stderr
    assert (logs / "proc_0.prev.log").read_text() == "my precious log\n"
    assert (logs / "proc_1.prev.log").is_symlink()
    assert (tmp_path / "target").read_text() == "not a log\n"
    assert (logs / "proc_0.log").read_text() == "" and not (logs / "proc_1.log").is_symlink()
    r = _run([LAUNCH / "local.sh", "-n", 2, "--cpu", "--", "true"], _env(LOG_DIR=logs),
             cwd=tmp_path)  # empty logs: nothing to keep, nothing said
    assert r.returncode == 0 and "kept as" not in r.stderr, r.stderr


def test_local_cpu_processes_get_their_ids(tmp_path):
    logs = tmp_path / "logs"
    r = _run([LAUNCH / "local.sh", "-n", 2, "-d", 1, "--cpu", "--", sys.executable, "-c",
              PRINT_ENV], _env(LOG_DIR=logs), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [(logs / f"proc_{i}.log").read_text().strip().splitlines() for i in range(2)]
    fields = [ls[-1].split() for ls in lines]
    assert [f[0] for f in fields] == ["0", "1"]
    assert all(f[1] == "2" for f in fields)
    coordinator = fields[0][2]
    host, port = coordinator.split(":")
    assert host == "127.0.0.1" and port.isdigit() and fields[1][2] == coordinator
    assert all(f[3] == "--xla_force_host_platform_device_count=1" for f in fields)
    assert "0 2 127.0.0.1:" in r.stdout  # process 0's output is also shown on the terminal
    assert "1 2 127.0.0.1:" not in r.stdout


def test_local_port_devices_and_gpu_slices(tmp_path):
    logs = tmp_path / "logs"
    r = _run([LAUNCH / "local.sh", "-n", 2, "-d", 3, "-p", 23456, "--cpu", "--",
              sys.executable, "-c", PRINT_ENV + "; print(os.environ['JAX_PLATFORMS'])"],
             _env(LOG_DIR=logs), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    text = (logs / "proc_1.log").read_text()
    assert "1 2 127.0.0.1:23456 --xla_force_host_platform_device_count=3" in text
    assert "cpu" in text.split()
    # without --cpu: process i gets its slice of the visible GPUs (nothing imports JAX here)
    show = ("import os; print('GPUS', os.environ['EMIT_PROCESS_ID'], "
            "os.environ['CUDA_VISIBLE_DEVICES'], os.environ.get('JAX_PLATFORMS', '-'))")
    r = _run([LAUNCH / "local.sh", "-n", 2, "-d", 2, "--", sys.executable, "-c", show],
             _env(LOG_DIR=logs, CUDA_VISIBLE_DEVICES="4,5,6,7"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "GPUS 0 4,5 -" in (logs / "proc_0.log").read_text()
    assert "GPUS 1 6,7 -" in (logs / "proc_1.log").read_text()
    r = _run([LAUNCH / "local.sh", "-n", 2, "-d", 4, "--", "true"],
             _env(LOG_DIR=logs, CUDA_VISIBLE_DEVICES="0,1"), cwd=tmp_path)
    assert r.returncode == 2 and "need 8 GPUs" in r.stderr


def test_local_failing_child_fails_the_launch(tmp_path):
    code = "import os,sys; sys.exit(3 if os.environ['EMIT_PROCESS_ID']=='1' else 0)"
    r = _run([LAUNCH / "local.sh", "-n", 2, "-d", 1, "--cpu", "--", sys.executable, "-c", code],
             _env(LOG_DIR=tmp_path / "logs"), cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    assert "process 1 exited with status 3" in r.stderr


def test_local_failure_stops_the_others(tmp_path):
    """Process 1 fails while 0 and 2 would run for a minute (2 ignoring SIGTERM): both are
    stopped, and the launch returns process 1's status at once."""
    pids = tmp_path / "pids"
    pids.mkdir()
    code = ("import os, signal, sys, time\n"
            "i = os.environ['EMIT_PROCESS_ID']\n"
            f"open(os.path.join({str(pids)!r}, i), 'w').write(str(os.getpid()))\n"
            "if i == '2': signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "if i == '1': time.sleep(0.5); sys.exit(7)\n"
            "time.sleep(60)\n")
    t0 = time.time()
    r = _run([LAUNCH / "local.sh", "-n", 3, "--cpu", "--", sys.executable, "-c", code],
             _env(LOG_DIR=tmp_path / "logs", KILL_GRACE=1), cwd=tmp_path, timeout=30)
    assert r.returncode == 7, r.stderr
    assert time.time() - t0 < 20
    for i in ("0", "2"):
        pid = int((pids / i).read_text())
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"process {i} still runs"
    assert "SIGKILL" in r.stderr  # process 2 ignored SIGTERM


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


# ------------------------------------------------------------------------------ tpu_pod.sh
def test_tpu_dry_run_prints_gcloud_commands(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "gcloud_ran"
    _stub(bin_dir, "gcloud", f"touch {marker}\nexit 1\n")  # a dry run must not call it
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", DRY_RUN=1, TPU_NAME="emit-v5p",
               TPU_ZONE="us-east5-a")
    r = _run([LAUNCH / "tpu_pod.sh", "run"], env)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("gcloud compute tpus tpu-vm ssh emit-v5p")
    assert "--worker=all" in line and "--zone=us-east5-a" in line
    assert ("python -m emit_jax.train --config=configs/internvl3_8b_grpo.py "
            "--workdir=runs/internvl3_8b_grpo --config.mesh.data=1 --config.mesh.fsdp=-1 "
            "--config.mesh.tensor=1") in line
    assert "export TPU_NAME=emit-v5p" in line  # what makes parallel.initialize detect the pod
    r = _run([LAUNCH / "tpu_pod.sh", "--dry-run", "--type", "v5p-32", "--project", "proj",
              "create"], env)
    assert r.returncode == 0, r.stderr
    assert ("gcloud compute tpus tpu-vm create emit-v5p --zone=us-east5-a --project=proj "
            "--accelerator-type=v5p-32 --version=v2-alpha-tpuv5") in r.stdout
    r = _run([LAUNCH / "tpu_pod.sh", "setup"], env)
    assert r.returncode == 0, r.stderr
    assert "--worker=all" in r.stdout and "pip install -e ." in r.stdout
    r = _run([LAUNCH / "tpu_pod.sh", "delete"], env)
    assert "gcloud compute tpus tpu-vm delete emit-v5p --zone=us-east5-a --quiet" in r.stdout
    assert not marker.exists()


def test_tpu_run_passes_arguments_and_needs_a_zone(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    out = tmp_path / "args"
    # a real run through a stub gcloud: every argument on its own line
    _stub(bin_dir, "gcloud", f'printf "%s\\n" "$@" > {out}\n')
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", TPU_NAME="pod", TPU_ZONE="us-east5-a",
               TPU_PROJECT="proj", CONFIG="configs/grpo.py", EXTRA_ARGS="--config.log_every=1", MESH_DATA=2)
    r = _run([LAUNCH / "tpu_pod.sh", "run", "--", "--config.data.source=/mnt/my data"], env)
    assert r.returncode == 0, r.stderr
    args = out.read_text().splitlines()
    assert args[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod"] and "--worker=all" in args
    command = [a for a in args if a.startswith("--command=")][0]
    assert ("exec python -m emit_jax.train --config=configs/grpo.py --workdir=runs/grpo "
            "--config.mesh.data=2 --config.mesh.fsdp=-1 --config.mesh.tensor=1 "
            "--config.log_every=1 --config.data.source=/mnt/my\\ data") in command
    # a config's variant gets its own default workdir, as emit_jax.train gives it (before:
    # configs/grpo.py:plain ran in runs/grpo and loaded the difficulty-aware run's stages)
    env.update(CONFIG="configs/grpo.py:plain")
    r = _run([LAUNCH / "tpu_pod.sh", "run"], env)
    assert r.returncode == 0, r.stderr
    assert ("--config=configs/grpo.py:plain --workdir=runs/grpo-plain "
            in [a for a in out.read_text().splitlines() if a.startswith("--command=")][0])
    r = _run([LAUNCH / "tpu_pod.sh", "run"], _env(DRY_RUN=1, TPU_NAME="pod"))
    assert r.returncode == 2 and "zone" in r.stderr


# ------------------------------------------------------------------------ slurm_a100.sbatch
def test_slurm_batch_script_under_stubs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "scontrol", 'echo "scontrol $*" >&2\nprintf "gpu012\\ngpu013\\n"\n')
    _stub(bin_dir, "srun", 'echo "SRUN $*"\n'
          'echo "ENV MASTER_ADDR=$MASTER_ADDR PORT=$EMIT_COORDINATOR_PORT '
          'COORD=${EMIT_COORDINATOR:-unset}"\n')
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu[012-013]",
               SLURM_JOB_NUM_NODES=2, SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_ID=42,
               EMIT_COORDINATOR="stale:1",  # from the submitting shell: must not leak through
               EXTRA_ARGS="--config.init_from=runs/sft/model --config.data.source=/data/mpdd")
    r = _run(["bash", LAUNCH / "slurm_a100.sbatch", "--config.grpo.steps=5"], env)
    assert r.returncode == 0, r.stderr
    srun = [ln for ln in r.stdout.splitlines() if ln.startswith("SRUN ")]
    assert len(srun) == 1
    assert "--ntasks-per-node=1" in srun[0] and "--nodes=2" in srun[0]
    assert ("-m emit_jax.train --config=configs/internvl3_8b_grpo.py "
            "--workdir=runs/internvl3_8b_grpo --config.mesh.data=2 --config.mesh.fsdp=-1 "
            "--config.mesh.tensor=1 --config.init_from=runs/sft/model "
            "--config.data.source=/data/mpdd --config.grpo.steps=5") in srun[0]
    assert "ENV MASTER_ADDR=gpu012 PORT=12355 COORD=unset" in r.stdout
    assert "show hostnames gpu[012-013]" in r.stderr

    env.update(CONFIG="configs/grpo.py", WORKDIR=str(tmp_path / "run"), MESH_DATA="1",
               EMIT_COORDINATOR_PORT="23456", EXTRA_ARGS="")
    r = _run(["bash", LAUNCH / "slurm_a100.sbatch"], env)
    assert r.returncode == 0, r.stderr
    assert (f"--config=configs/grpo.py --workdir={tmp_path / 'run'} --config.mesh.data=1 "
            "--config.mesh.fsdp=-1 --config.mesh.tensor=1") in r.stdout
    assert "PORT=23456" in r.stdout
    env.update(CONFIG="configs/grpo.py:smoke", WORKDIR="")  # the variant's own default
    r = _run(["bash", LAUNCH / "slurm_a100.sbatch"], env)
    assert r.returncode == 0, r.stderr
    assert "--config=configs/grpo.py:smoke --workdir=runs/grpo-smoke " in r.stdout


def test_slurm_batch_script_needs_an_allocation():
    r = _run(["bash", LAUNCH / "slurm_a100.sbatch"], _env())
    assert r.returncode != 0 and "SLURM" in r.stderr


def test_sbatch_header():
    text = (LAUNCH / "slurm_a100.sbatch").read_text()
    header = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
    for want in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=",
                 "--time="):
        assert any(want in ln for ln in header), want
    # sbatch reads #SBATCH lines only before the first command
    first_cmd = next(i for i, ln in enumerate(text.splitlines())
                     if ln.strip() and not ln.startswith("#"))
    assert all(text.splitlines().index(ln) < first_cmd for ln in header)


def test_tpu_pod_needs_gcloud_and_a_project_before_its_first_command(tmp_path):
    """Fifteenth-probe leftover: ``tpu_pod.sh --name N --zone Z create`` with no project went
    straight to ``gcloud ... create`` (a real cloud call) and left the failure to gcloud; with
    no gcloud at all it was bash's "command not found"."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "basename", "cat"):  # a PATH with these and no gcloud
        os.symlink(shutil.which(tool), bin_dir / tool)
    env = _env(PATH=str(bin_dir), TPU_NAME="emit-v5p", TPU_ZONE="us-east5-a")
    r = _run(["bash", LAUNCH / "tpu_pod.sh", "create"], env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == ("tpu_pod.sh: gcloud not found on PATH: install the Google Cloud "
                                "CLI, or see the commands with --dry-run")
    calls = tmp_path / "calls"
    _stub(bin_dir, "gcloud", f'echo "$*" >> {calls}\n'
                             '[[ $1 == config ]] && echo "${STUB_PROJECT:-}"\nexit 0\n')
    r = _run(["bash", LAUNCH / "tpu_pod.sh", "create"], env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().endswith("no Google Cloud project: pass --project P (or "
                                     "TPU_PROJECT=...), or run 'gcloud config set project P'")
    assert calls.read_text().splitlines() == ["config get-value project"]  # nothing created
    r = _run(["bash", LAUNCH / "tpu_pod.sh", "create"], dict(env, STUB_PROJECT="proj"))
    assert r.returncode == 0, r.stderr
    assert calls.read_text().splitlines()[-1].startswith("compute tpus tpu-vm create emit-v5p")


@pytest.mark.parametrize("var, value, line", [
    ("MESH_DATA", "abc", "tpu_pod.sh: MESH_DATA: 'abc' is no axis size (a positive whole number, "
                         "or -1 for the rest)"),
    ("MESH_FSDP", "0", "tpu_pod.sh: MESH_FSDP: '0' is no axis size (a positive whole number, or "
                       "-1 for the rest)"),
    ("CONFIG", "configs/nosuch.py", "tpu_pod.sh: CONFIG: no such config file: configs/nosuch.py "
                                    "(relative to the repository root)"),
])
def test_tpu_pod_checks_the_mesh_and_config_here(tmp_path, var, value, line):
    """Fifteenth probe L2 / L7: a dry run printed ``--config.mesh.data=abc`` and a missing
    config as given, for the rented workers to refuse."""
    env = _env(DRY_RUN=1, TPU_NAME="pod", TPU_ZONE="us-east5-a", **{var: value})
    r = _run([LAUNCH / "tpu_pod.sh", "run"], env, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == line, r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("arg, line", [
    ("--config=configs/sft.py", "tpu_pod.sh: --config in TRAIN_ARGS/EXTRA_ARGS: set CONFIG=... / "
                                "WORKDIR=... instead (the script passes them)"),
    ("--workdir=runs/x", "tpu_pod.sh: --workdir in TRAIN_ARGS/EXTRA_ARGS: set CONFIG=... / "
                         "WORKDIR=... instead (the script passes them)"),
    ("--config.mesh.fsdp=4", "tpu_pod.sh: --config.mesh.fsdp in TRAIN_ARGS/EXTRA_ARGS: set "
                             "MESH_DATA / MESH_FSDP / MESH_TENSOR instead (the script passes "
                             "them)"),
])
def test_tpu_pod_refuses_train_args_it_sets_itself(tmp_path, arg, line):
    """Seventeenth probe TP1 (and the MESH_FSDP case before it): a second --config, --workdir
    or mesh size after ``--`` was printed for the workers, whose train refuses it only after
    the slice was made and set up."""
    env = _env(DRY_RUN=1, TPU_NAME="pod", TPU_ZONE="us-east5-a")
    r = _run([LAUNCH / "tpu_pod.sh", "run", "--", arg], env)
    assert r.returncode == 2 and r.stderr.strip() == line, r.stderr


@pytest.mark.parametrize("name, zone, line", [
    (" ", "us-east5-a", "tpu_pod.sh: TPU name ' ': lowercase letters, digits and hyphens, starting "
                        "with a letter (at most 63)"),
    ("Pod_1", "us-east5-a", "tpu_pod.sh: TPU name 'Pod_1': lowercase letters, digits and "
                            "hyphens, starting with a letter (at most 63)"),
    ("pod", "z", "tpu_pod.sh: zone 'z' is not a zone name (like us-central2-b)"),
    ("pod", "us-east5-a --quiet", "tpu_pod.sh: zone 'us-east5-a --quiet' is not a zone name "
                                  "(like us-central2-b)"),
])
def test_tpu_pod_checks_the_name_and_zone_here(name, zone, line):
    """Eighteenth-session leftover: a name of ' ' (or any other) reached gcloud's create."""
    r = _run([LAUNCH / "tpu_pod.sh", "--dry-run", "--name", name, "--zone", zone, "--project",
              "proj", "create"], _env())
    assert r.returncode == 2 and r.stderr.strip() == line, r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("tpu_type, line", [
    ("v5p-0", "tpu_pod.sh: TPU type 'v5p-0' is not an accelerator type (like v5p-8, "
              "v5litepod-16, v6e-8)"),
    ("v5p", "tpu_pod.sh: TPU type 'v5p' is not an accelerator type (like v5p-8, v5litepod-16, "
            "v6e-8)"),
    ("v5p-08", "tpu_pod.sh: TPU type 'v5p-08' is not an accelerator type (like v5p-8, "
               "v5litepod-16, v6e-8)"),
    ("v5p-7", "tpu_pod.sh: TPU type 'v5p-7': v5p sizes count TensorCores, two per chip (an even "
              "number, like v5p-8)"),
    ("v4-8 --quiet", "tpu_pod.sh: TPU type 'v4-8 --quiet' is not an accelerator type (like "
                     "v5p-8, v5litepod-16, v6e-8)"),
])
def test_tpu_pod_checks_the_accelerator_type_here(tpu_type, line):
    """Twenty-second probe L07/L10: ``--type v5p-0`` (or v5p-7) reached gcloud's create."""
    r = _run([LAUNCH / "tpu_pod.sh", "--dry-run", "--name", "pod", "--zone", "us-east5-a",
              "--project", "proj", "--type", tpu_type, "create"], _env())
    assert r.returncode == 2 and r.stderr.strip() == line, r.stderr
    assert r.stdout == ""
    for good in ("v5p-16", "v5litepod-1", "v6e-8"):
        r = _run([LAUNCH / "tpu_pod.sh", "--dry-run", "--name", "pod", "--zone", "us-east5-a",
                  "--project", "proj", "--type", good, "create"], _env())
        assert r.returncode == 0 and f"--accelerator-type={good}" in r.stdout, r.stderr


_SLOW_STOP = ("import os, signal, sys, time\n"
              "i = os.environ['EMIT_PROCESS_ID']\n"
              "terms = []\n"
              "def on_term(signum, frame):\n"
              "    terms.append(signum)\n"
              "    if len(terms) > 1:\n"
              "        print(f'process {i}: stopped at once', flush=True); os._exit(130)\n"
              "signal.signal(signal.SIGTERM, on_term)\n"
              "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
              "open(os.path.join(sys.argv[1], i), 'w').write(str(os.getpid()))\n"
              "while not terms: time.sleep(0.05)\n"
              "time.sleep(float(os.environ.get('SLOW', '4')))  # a checkpoint being finished\n"
              "print(f'process {i}: stopped after the write', flush=True); sys.exit(130)\n")


def _launch_and_signal(tmp_path, signals, slow=4):
    """local.sh -n 2 over :data:`_SLOW_STOP`; once both processes run, ``signals`` ([(signal,
    delay before it)]) go to local.sh. -> (the finished process, seconds from the first signal)."""
    import signal as _signal

    pids = tmp_path / "pids"
    pids.mkdir()
    p = subprocess.Popen([str(LAUNCH / "local.sh"), "-n", "2", "-d", "1", "--cpu", "--",
                          sys.executable, "-c", _SLOW_STOP, str(pids)], cwd=tmp_path,
                         env=_env(LOG_DIR=str(tmp_path / "logs"), KILL_GRACE="40", SLOW=str(slow)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while len(os.listdir(pids)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    t0 = time.time()
    for sig, delay in signals:
        time.sleep(delay)
        p.send_signal(getattr(_signal, sig))
    out, err = p.communicate(timeout=60)
    children = [int((pids / i).read_text()) for i in ("0", "1")]
    assert all(not Path(f"/proc/{c}").exists() or _is_zombie(c) for c in children), err
    return p.returncode, err, time.time() - t0, (tmp_path / "logs" / "proc_1.log").read_text()


@pytest.mark.parametrize("sig, status, said", [("SIGHUP", 129, "hung up"),
                                               ("SIGUSR1", 138, "SIGUSR1 (a pre-emption warning)")])
def test_local_hangup_and_sigusr1_stop_the_processes_with_lines(tmp_path, sig, status, said):
    """28th probe P2: SIGHUP (a closed terminal) or SIGUSR1 (SLURM's --signal=B:USR1) ended
    local.sh without a line or a summary."""
    rc, err, _, log1 = _launch_and_signal(tmp_path, [(sig, 0)])
    assert rc == status, err
    assert f"local.sh: {said}; stopping all 2 processes" in err
    assert "local.sh: stopped (exit statuses 0:130 1:130)" in err
    assert "process 1: stopped after the write" in log1


def test_local_second_signal_is_passed_on_and_the_summary_still_comes(tmp_path):
    """28th probe P3: a second signal while the processes were stopping ended local.sh at once,
    without its summary, the processes still running. Now it is passed on (a second SIGTERM,
    the trainer's "stop at once"), and local.sh waits for them."""
    rc, err, seconds, log1 = _launch_and_signal(tmp_path, [("SIGINT", 0), ("SIGTERM", 0.5)],
                                                slow=20)
    assert rc == 130, err
    lines = [x for x in err.splitlines() if x.startswith("local.sh:")][1:]
    assert lines == ["local.sh: interrupted; stopping all 2 processes",
                     "local.sh: terminated again; telling the processes to stop at once",
                     "local.sh: stopped (exit statuses 0:130 1:130)"], err
    assert "process 1: stopped at once" in log1 and seconds < 12  # not the 20 s write


def test_local_names_the_killed_process_not_the_one_that_lost_it(tmp_path):
    """28th probe P1: process 1 killed (kill -9) and process 0 ending at once because it lost
    that peer (status 2) were found in one look, and local.sh said "first failure: process 0,
    status 2" and pointed at process 0's log."""
    code = ("import os, signal, sys, time\n"
            "i, d = os.environ['EMIT_PROCESS_ID'], sys.argv[1]\n"
            "open(os.path.join(d, i), 'w').write(str(os.getpid()))\n"
            "while len(os.listdir(d)) < 2: time.sleep(0.01)\n"
            "time.sleep(0.5)\n"
            "if i == '1': os.kill(os.getpid(), signal.SIGKILL)\n"
            "peer = int(open(os.path.join(d, '1')).read())\n"
            "while os.path.exists(f'/proc/{peer}') and open(f'/proc/{peer}/stat').read()"
            ".split(')')[-1].split()[0] != 'Z': time.sleep(0.005)\n"
            "print('another process ended', flush=True); sys.exit(2)\n")
    pids = tmp_path / "pids"
    pids.mkdir()
    r = _run([LAUNCH / "local.sh", "-n", 2, "--cpu", "--", sys.executable, "-c", code, pids],
             _env(LOG_DIR=tmp_path / "logs", KILL_GRACE=5), cwd=tmp_path, timeout=60)
    assert r.returncode == 137, r.stderr
    assert "local.sh: process 1 exited with status 137; stopping the others" in r.stderr
    # process 0 ended by itself (2), or by local.sh's SIGTERM when process 1 was found first
    assert re.search(r"first failure: process 1, status 137\); exit statuses 0:(2|143) 1:137; "
                     r"see \S+/proc_1\.log", r.stderr), r.stderr


def test_local_an_agreed_stop_is_said_as_a_stop_not_a_failure(tmp_path):
    """29th probe U1: a signal to one trainer stops all of them after the same step (each exits
    130), and local.sh said "failed (first failure: process 0, status 130)"."""
    # each is in the same agreed stop: the one that ends a moment later gets local.sh's SIGTERM
    # while stopping, and ends with the same 130 (before, on a loaded host it died of the
    # SIGTERM, 143, and the exact summary below did not match). Neither ends before both have
    # their handler (before, a process that started 0.5 s later under load met the SIGTERM
    # before its handler was set: 143 again)
    ready = tmp_path / "ready"
    ready.mkdir()
    code = ("import os, signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(130)); "
            f"d = {str(ready)!r}; open(os.path.join(d, str(os.getpid())), 'w').close(); "
            "t = time.time() + 120\n"
            "while len(os.listdir(d)) < 2 and time.time() < t: time.sleep(0.02)\n"
            "time.sleep(0.2); sys.exit(130)")
    r = _run([LAUNCH / "local.sh", "-n", 2, "--cpu", "--", sys.executable, "-c", code],
             _env(LOG_DIR=tmp_path / "logs"), cwd=tmp_path)
    assert r.returncode == 130, r.stderr
    assert re.search(r"local\.sh: stopped \(process [01] was interrupted first, status 130\); "
                     r"exit statuses 0:130 1:130; see \S+/proc_[01]\.log", r.stderr), r.stderr
    assert "failed" not in r.stderr
