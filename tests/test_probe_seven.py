"""The seventh reliability probe's cases (issue 30): each failed before its fix (the SIGHUP,
image-depth, huge-image and killed-generator cases live beside their kind, in
tests/test_reliability.py, test_cli_errors.py, test_image.py and test_embedded_cli.py).

* an MMAD question or option holding ``<image>``, ``<IMG_CONTEXT>`` or another marker the prompt
  builder writes (a ``ValueError`` traceback at that question, after the model was loaded and
  the earlier questions asked), an empty option text (asked without a word).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from emit_jax.errors import MMADError

from test_cli_errors import tiny_model  # noqa: F401 (a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MMAD = os.path.join(ROOT, "tests", "fixtures", "mmad")


def _mmad_with(tmp_path, edit) -> str:
    """A copy of the MMAD fixture whose first record's first question ``edit`` changed."""
    root = tmp_path / "mmad"
    shutil.copytree(MMAD, root)
    path = root / "mmad.json"
    data = json.loads(path.read_text())
    first = next(iter(data))
    edit(data[first]["conversation"][0])
    path.write_text(json.dumps(data))
    return str(root)


@pytest.mark.parametrize("where,text,needle", [
    ("Question", "Is there any defect in the object? <image> look again",
     "'Question' holds '<image>', a marker the prompt builder places itself"),
    ("Question", "Is there <IMG_CONTEXT><COMP_CONTEXT> any defect?", "holds '<IMG_CONTEXT>'"),
    ("A", "<image>", "option 'A' holds '<image>'"),
    ("B", "No.<|im_end|>", "option 'B' holds '<|im_end|>'"),
    ("A", "  ", "option 'A' is empty"),
])
def test_a_question_holding_a_prompt_marker_or_an_empty_option_is_refused(tmp_path, where,
                                                                         text, needle):
    from emit_jax.data.mmad import read_mmad

    def edit(q):
        if where == "Question":
            q["Question"] = text
        else:
            q["Options"][where] = text

    root = _mmad_with(tmp_path, edit)
    with pytest.raises(MMADError, match="question 0") as e:
        read_mmad(root)
    assert needle in str(e.value)
    records, report = read_mmad(root, policy="skip")  # skipped and counted under --policy skip
    assert report.n_skipped == 1 and needle in report.skipped[0]


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo"])
def test_a_lock_file_that_is_a_link_or_no_file_is_refused_and_its_target_kept(tmp_path, kind):
    """Before: ``ln -s ~/notes.txt WD/.lock`` then ``train --workdir WD`` (or a link as
    ``data.build``'s ``.<out>.lock``): the lock was opened through the link, the user's file
    truncated and the holder written into it, exit 0 (``data.build`` then removed the link)."""
    from emit_jax.fileio import output_lock

    victim = tmp_path / "notes.txt"
    victim.write_text("my notes\n")
    out = tmp_path / "o" / "b.jsonl"
    out.parent.mkdir()
    lock = out.parent / ".b.jsonl.lock"
    if kind == "symlink":
        os.symlink(victim, lock)
    elif kind == "hardlink":
        os.link(victim, lock)
    else:
        os.mkfifo(lock)
    with pytest.raises(FileExistsError, match="where this command keeps its lock file"):
        with output_lock(str(out), what="x", hint="y"):
            pytest.fail("the block ran")
    assert victim.read_text() == "my notes\n"
    assert os.path.lexists(lock) and not out.exists()


def test_train_on_a_folder_whose_lock_is_a_link_leaves_the_target(tmp_path):
    import subprocess
    import sys

    victim = tmp_path / "notes.txt"
    victim.write_text("my notes\n")
    wd = tmp_path / "wd"
    wd.mkdir()
    os.symlink(victim, wd / ".lock")
    r = subprocess.run([sys.executable, "-m", "emit_jax.train", "--config",
                        "configs/grpo.py:smoke", "--workdir", str(wd)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "where this command keeps its lock file" in lines[0], lines
    assert victim.read_text() == "my notes\n"
    assert sorted(os.listdir(wd)) == [".lock"]


def test_plan_mesh_empty_and_a_dangling_workdir_link_are_said_as_they_are(tmp_path):
    """Before: ``plan --mesh ''`` planned the default mesh without a word; ``train --workdir``
    on a link to nothing said "a file"."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "emit_jax.plan", "--config", "configs/grpo.py",
                        "--mesh", ""], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "emit_jax.plan: error: --mesh '': empty; name the sizes (e.g. fsdp=8) or leave --mesh "
        "out"], r.stderr
    from emit_jax.train import check_workdir_name

    os.symlink(tmp_path / "nothing", tmp_path / "link")
    with pytest.raises(Exception, match="a symbolic link to nothing .*, not a folder"):
        check_workdir_name(str(tmp_path / "link"))


def test_evaluate_out_past_path_max_says_the_name_is_too_long(tmp_path):
    """Before: "exists and is not a regular file (cannot be looked at: File name too long)" for
    a path where nothing exists."""
    from emit_jax.evaluate import check_out_is_a_file

    deep = os.path.join(str(tmp_path), *["d" * 200] * 23, "x.json")
    check_out_is_a_file(deep)  # nothing there: the write says "File name too long"


def test_an_unwritable_cache_folder_is_named_as_the_user_set_it(tmp_path):
    """Before: ``EMIT_JAX_CACHE`` naming a read-only folder ended with ``error:
    <cache>/embedded-v2-seed0.tmp-czlrna1s: Operation not permitted``, a folder the user never
    named. Run as an unprivileged user (root writes anywhere)."""
    import stat
    import subprocess
    import sys
    import tempfile

    if os.geteuid() == 0:  # dropped to nobody, which must reach the interpreter and the code
        for path in (os.path.realpath(sys.executable), ROOT):
            while path != os.path.dirname(path):
                path = os.path.dirname(path)
                if not os.stat(path).st_mode & stat.S_IXOTH:
                    pytest.skip(f"as root, and {path} is closed to other users")
    base = tempfile.mkdtemp(prefix="emit-cache-")  # beside pytest's 0700 folders: reachable
    try:
        os.chmod(base, 0o755)
        cache = os.path.join(base, "ro")
        os.mkdir(cache)
        os.chmod(cache, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP
                 | stat.S_IROTH | stat.S_IXOTH)

        def unprivileged():
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)

        code = ("from emit_jax.data.embedded.cache import ensure_cached\n"
                "from emit_jax.errors import DataError\n"
                "try:\n    ensure_cached()\nexcept DataError as e:\n    print(e)\n")
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                           text=True, timeout=120, preexec_fn=unprivileged,
                           env={**os.environ, "EMIT_JAX_CACHE": cache, "HOME": base})
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.startswith(f"$EMIT_JAX_CACHE={cache}: cannot write there ("), r.stdout
        assert os.listdir(cache) == []
    finally:
        os.chmod(os.path.join(base, "ro"), 0o755)
        shutil.rmtree(base)


def _hf_copy(tiny_model, tmp_path) -> str:
    d = tmp_path / "hf"
    shutil.copytree(tiny_model["hf"], d)
    return str(d)


def test_weights_stored_as_integers_or_an_unknown_dtype_are_refused(tmp_path, tiny_model):
    """Before: an embedding table stored as int32 was loaded (and converted) as int32 without
    a word; config.json's ``"dtype": "float8"`` ran as float32 without a word."""
    from safetensors.numpy import load_file, save_file

    from emit_jax import hf
    from emit_jax.errors import CheckpointError, ConfigError

    d = _hf_copy(tiny_model, tmp_path)
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("embed_tokens.weight"))
    tensors[key] = tensors[key].astype("int32")
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="tensor .*embed_tokens.weight is stored as int32"):
        hf.load(d)

    d2 = _hf_copy(tiny_model, tmp_path / "b")
    cfg = json.loads(open(os.path.join(d2, "config.json")).read())
    cfg["dtype"] = "float8"
    cfg.pop("torch_dtype", None)
    open(os.path.join(d2, "config.json"), "w").write(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"dtype 'float8' is not one this port computes in"):
        hf.load(d2)


def test_a_single_weights_file_is_read_before_a_stale_index(tmp_path, tiny_model):
    """transformers' order: ``model.safetensors`` first. Before: a stale index beside it was
    preferred ("weights do not match config.json: 41 missing")."""
    import numpy as np

    from emit_jax import hf

    d = _hf_copy(tiny_model, tmp_path)
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"x.weight": "model-00001-of-00002.safetensors"}}, f)
    got = hf.load(d)
    want = hf.load(tiny_model["hf"])
    from flax import nnx

    a, b = nnx.to_flat_state(nnx.state(got)), nnx.to_flat_state(nnx.state(want))
    assert len(a) == len(b)
    for (pa, va), (pb, vb) in zip(a, b):
        assert pa == pb and np.array_equal(np.asarray(va.get_value()), np.asarray(vb.get_value()))


def test_a_finished_stage_whose_model_or_tokenizer_was_replaced_is_refused(tmp_path):
    """Before: ``rm -rf W/base/model; cp -r OTHER W/base/model`` (or another tokenizer copied
    into ``W/tokenizer``), rerun: "[base] already finished; loaded ..." and the held-out table
    computed with the foreign model, no word."""
    from flax import nnx

    from emit_jax.data.tokenizer import train_tiny_tokenizer
    from emit_jax.errors import CheckpointError
    from emit_jax.models.internvl import InternVL
    from emit_jax.training.stages import check_stage_model
    from test_evaluate import tiny_for

    tok = train_tiny_tokenizer(None, tmp_path / "tok")
    # the run's own models: the tokenizer's rows (without <COMP_CONTEXT> before stage 1) or all
    for rows in (len(tok) - 1, len(tok)):
        check_stage_model(InternVL(tiny_for(tok, rows), rngs=nnx.Rngs(0)), tok, "W", "base")
    other = tiny_for(tok, 64).replace(image_token_id=63)  # another model altogether
    with pytest.raises(CheckpointError, match=r"W/base/model: does not fit this workdir's "
                                              r"tokenizer .* one of them was replaced"):
        check_stage_model(InternVL(other, rngs=nnx.Rngs(0)), tok, "W", "base")
    short = tiny_for(tok, len(tok) - 2)  # a tokenizer with tokens the model has no row for
    with pytest.raises(CheckpointError, match="does not fit"):
        check_stage_model(InternVL(short, rngs=nnx.Rngs(0)), tok, "W", "base")


BASE_ONLY = ("--config", "configs/grpo.py:smoke", "--config.stages=('base',)",
             "--config.base.steps=1", "--config.export_hf=False", "--config.eval_limit=0")


@pytest.mark.parametrize("override, needle, workdir_made", [
    ("kernels.decode_bucket=0", "config kernels.decode_bucket: 0 is below 1", False),
    ("memory.attention_chunk=-1", "config memory.attention_chunk: -1 is below 0", False),
    # eighteenth probe B11: the options' own wording ("kernels.attention must be one of")
    ("kernels.attention=AUTO", "config kernels.attention: 'AUTO' must be one of einsum, "
                               "dot_product, splash, auto", False),
    ("kernels.attention=splash", "config kernels.attention: 'splash' is a TPU kernel", False),
    ("emit.bn_mode=bogus", "config emit: bn_mode must be 'standard' or 'official'", False),
    ("data.length_buckets=(8,)", "config data.length_buckets: a sequence of", True),
])
def test_training_settings_that_fail_late_are_one_line(tmp_path, override, needle, workdir_made):
    """Before: ValueError tracebacks (the kernel and memory options were built before the
    config was checked; a bucket smaller than every prompt failed inside grain), a tracer
    error for the TPU-only splash kernel on a CPU, and ``emit.bn_mode=bogus`` accepted when no
    stage read it."""
    import subprocess
    import sys

    wd = tmp_path / "wd"
    r = subprocess.run([sys.executable, "-m", "emit_jax.train", *BASE_ONLY, "--workdir", str(wd),
                        f"--config.{override}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"emit_jax.train: error: {needle}"), \
        r.stderr[-2000:]
    assert wd.exists() == workdir_made  # the bucket is met when the first batch is made


def _splits_dataset(tmp_path, splits) -> str:
    from test_tasks import make_mvtec

    src = make_mvtec(tmp_path / "ds", classes=("widget",))
    with open(os.path.join(src, "splits.json"), "w") as f:
        json.dump(splits(src) if callable(splits) else splits, f)
    return src


def test_splits_entries_outside_the_dataset_or_not_images_are_said(tmp_path):
    """Before: absolute paths (even of the dataset's own images), a mask and a folder listed
    in a split were dropped without a word; an empty split was "no such split"."""
    from emit_jax.data.mvtec import Report, scan
    from emit_jax.data.records import build
    from emit_jax.errors import DataError

    good = os.path.join("widget", "train", "good")
    src = _splits_dataset(tmp_path / "a", lambda s: {"train": [os.path.join(s, good, "000.png")]})
    with pytest.raises(DataError, match=r"splits.json: split 'train' lists /.*000.png, outside "
                                        r"the dataset's own paths"):
        scan(src, report=Report())
    for entry, what in ((os.path.join("widget", "ground_truth"), "a folder"),
                        (good, "a folder")):
        src = _splits_dataset(tmp_path / what.replace(" ", "") / str(len(entry)),
                              {"train": [os.path.join(good, "000.png"), entry]})
        with pytest.raises(DataError, match=f"lists {entry} \\(train\\), which is {what}, not "
                                            "one of the dataset's images"):
            scan(src, report=Report())
    mask = next(os.path.join(dp, f) for dp, _, fs in os.walk(tmp_path / "a" / "ds")
                for f in fs if "ground_truth" in dp)
    rel = os.path.relpath(mask, tmp_path / "a" / "ds")
    src = _splits_dataset(tmp_path / "m", {"train": [os.path.join(good, "000.png"), rel]})
    with pytest.raises(DataError, match="which is a mask, not one of the dataset's images"):
        scan(src, report=Report())
    src = _splits_dataset(tmp_path / "e", {"train": [], "test": []})
    with pytest.raises(DataError, match=r"--split 'train': .*splits.json lists no image in that "
                                        r"split"):
        build(src, str(tmp_path / "out.jsonl"), stage=1)


def test_a_file_size_limit_while_converting_is_one_line_naming_the_output(tmp_path, tiny_model):
    """Before (``ulimit -f``, as a quota): a ValueError traceback from Orbax's writer, 270-320
    lines of its threads' logs and "Event loop is closed" tracebacks, naming the temporary
    folder; ``data.embedded`` said ``[Errno 27] File too large`` without a file."""
    import resource
    import subprocess
    import sys

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 * 1024, 20 * 1024))

    for args, out in ((["emit_jax.convert", "--hf", tiny_model["hf"]], tmp_path / "c"),
                      (["emit_jax.data.embedded", "--seed", "4"], tmp_path / "e")):
        r = subprocess.run([sys.executable, "-m", *args, "--out", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, preexec_fn=limited)
        assert r.returncode == 2, r.stderr[-3000:]
        assert r.stderr.splitlines() == [f"{args[0]}: error: {out}: File too large"], \
            r.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == []


def test_domain_knowledge_holding_a_prompt_marker_is_refused(tmp_path):
    """Before: every entry ending in ``<image> <IMG_CONTEXT>`` was a ValueError traceback at the
    first question, the model loaded."""
    from emit_jax.data.mmad import load_domain_knowledge

    (tmp_path / "domain_knowledge.json").write_text(json.dumps(
        {"MVTec": {"pill": {"good": "A white pill. <image>", "crack": "A crack."}}}))
    with pytest.raises(MMADError, match=r"'MVTec'/'pill'/'good': holds '<image>', a marker the "
                                        r"prompt builder places itself"):
        load_domain_knowledge(str(tmp_path))


def test_a_home_folder_in_a_path_setting_is_expanded(tmp_path, monkeypatch):
    """Before: ``--config.data.source=~/data`` (the shell leaves ``~`` after ``=``; the config
    files' own examples use that form) was "'~/data' is not a folder"."""
    from emit_jax import configs

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = configs.load(os.path.join(ROOT, "configs", "grpo.py") + ":smoke",
                       ["data.source=~/ds", "init_from=~/runs/m", "tokenizer=~/tok"])
    assert (cfg.data.source, cfg.init_from, cfg.tokenizer) == (
        str(tmp_path / "ds"), str(tmp_path / "runs" / "m"), str(tmp_path / "tok"))
    assert configs.load(os.path.join(ROOT, "configs", "grpo.py") + ":smoke").data.source == \
        "embedded"


def test_an_unusable_jax_compilation_cache_dir_is_one_warning(monkeypatch, capsys):
    """Before: ``JAX_COMPILATION_CACHE_DIR=/dev/null`` (or a read-only folder) gave JAX's
    two-line ``UserWarning`` at every compilation of the run."""
    import jax
    import ml_collections

    from emit_jax import train

    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/dev/null")
    try:
        train._compile_cache(ml_collections.ConfigDict({"compile_cache": "~/x"}))
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    err = capsys.readouterr()
    assert "warning: JAX_COMPILATION_CACHE_DIR=/dev/null: Not a directory; compiling without a " \
           "persistent cache" in err.out + err.err


def test_out_of_memory_names_the_commands_own_settings():
    """Before: ``demo`` and ``evaluate`` out of memory named training settings they do not
    have (batch, prompts_per_step, G)."""
    from emit_jax import cli

    e = RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 3727540932 bytes.")
    assert cli.out_of_memory(e, "emit_jax.demo").endswith(
        "(a smaller --arch or fewer --new-tokens)")
    assert "--max-new-tokens" in cli.out_of_memory(e, "emit_jax.evaluate")
    assert "prompts_per_step" in cli.out_of_memory(e, "emit_jax.train")
    assert cli.out_of_memory(ValueError("other"), "emit_jax.demo") is None


def test_demo_beyond_the_context_table1_set_twice_and_an_empty_count_are_said(tmp_path):
    """Before: ``demo --new-tokens 100000`` decoded until killed; ``table1 --set k=1 --set k=2``
    used the last; ``restated_answers`` on results without a four-option answer printed a bare
    table header."""
    import subprocess
    import sys

    from emit_jax import configs
    from emit_jax.errors import ConfigError

    r = subprocess.run([sys.executable, "-m", "emit_jax.demo", "--new-tokens", "100000"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "emit_jax.demo: error: --new-tokens 100000: with the demo's prompt (76 tokens) that "
        "passes tiny's context of 8,192 positions"], r.stderr
    with pytest.raises(ConfigError, match=r"--set base.steps: given twice, as '1' and '2'"):
        configs.parse_sets(["base.steps=1", "base.steps=2"])
    assert configs.parse_sets(["base.steps=1", "base.steps=1"]) == {"base.steps": "1"}
    res = tmp_path / "r.json"
    res.write_text(json.dumps({"answers": [], "think": True}))
    r = subprocess.run([sys.executable, "-m", "emit_jax.experiments.restated_answers", str(res)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0
    assert r.stderr.strip() == f"note: {res} holds no four-option answer to count (DC, DL, OC)"


def test_a_checkpoint_folder_that_stops_taking_files_is_one_line_and_no_hang(tmp_path):
    """Before: a stage's ``ckpt/`` made immutable (a permission change or a read-only mount
    under a running job): about 190 lines of Orbax's thread logs, the error line naming its
    temporary folder, then the process never exited (Python's exit waited for Orbax's threads).
    Needs ``chattr +i`` (root, a file system that has it)."""
    import subprocess
    import sys

    ckpt = tmp_path / "wd" / "base" / "ckpt"
    ckpt.mkdir(parents=True)
    # a workdir a run has started in (its lock's holder recorded): a folder holding only an
    # empty base/ckpt is a user's, refused as such (twenty-third probe N05)
    (tmp_path / "wd" / ".lock").write_text('{"pid": 1, "host": "h", "since": "t"}\n')
    if subprocess.run(["chattr", "+i", str(ckpt)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        r = subprocess.run([sys.executable, "-m", "emit_jax.train", "--config",
                            "configs/grpo.py:smoke", "--config.stages=('base',)",
                            "--config.base.steps=4", "--config.checkpoint_every=2",
                            "--config.export_hf=False", "--config.eval_limit=0",
                            "--workdir", str(tmp_path / "wd")], cwd=ROOT, capture_output=True,
                           text=True, timeout=400)
    finally:
        subprocess.run(["chattr", "-i", str(ckpt)])
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [line for line in r.stderr.replace("\r", "\n").splitlines()
             if line.strip() and not line.startswith(("[data]", "[model]", "[base]"))]
    assert lines == [f"emit_jax.train: error: {ckpt}: Operation not permitted: this folder no "
                     "longer takes new base checkpoints (its permissions or the file system "
                     "changed)"], r.stderr[-3000:]


def test_visualize_without_a_checkpoint_builds_the_vit_alone_with_the_same_weights():
    """Before: ``visualize --arch internvl3_8b`` built the whole 8B model for its ViT and was
    killed by the kernel (24 GB host). The ViT alone, drawn from ``Rngs(0)`` as InternVL draws
    it first, has the same weights, so the heat maps are unchanged."""
    import numpy as np
    from flax import nnx

    from emit_jax.models import architectures
    from emit_jax.models.internvit import InternViT
    from emit_jax.models.internvl import InternVL

    m = architectures.get_config("tiny")
    whole = nnx.to_flat_state(nnx.state(InternVL(m, rngs=nnx.Rngs(0)).vision_tower))
    alone = nnx.to_flat_state(nnx.state(InternViT(m.vision, dtype=m.dtype,
                                                  param_dtype=m.param_dtype, rngs=nnx.Rngs(0),
                                                  scan_layers=m.scan_layers)))
    assert [p for p, _ in whole] == [p for p, _ in alone]
    for (_, a), (_, b) in zip(whole, alone):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))


def test_none_for_a_switch_is_refused():
    """Before: ``--config.data.text_samples=None`` was accepted (ml_collections lets None into
    any field) and read as off; ``restart=1`` and ``export_hf=yes`` were refused already."""
    from emit_jax import configs
    from emit_jax.errors import ConfigError

    spec = os.path.join(ROOT, "configs", "grpo.py") + ":smoke"
    with pytest.raises(ConfigError, match=r"config data.text_samples=None: expected a bool value"):
        configs.load(spec, ["data.text_samples=None"])
    assert configs.load(spec, ["data.text_samples=True"]).data.text_samples is True
