"""The twelfth reliability probe's cases and the leftovers of the tenth (issue 30): each failed
before its fix."""

from __future__ import annotations

from conftest import train


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_a_workdir_whose_name_ends_with_a_blank_is_noted(tmp_path):
    """SP5 (tenth probe): ``--workdir 'w '`` (a copy-paste accident) ran with its progress lines
    naming ``w /curves.png``, the blank unseen, and nothing said it."""
    source = tmp_path / "src"
    source.mkdir()  # no images: the run stops at the data, after the note
    wd = tmp_path / "w "
    r = train("--config", "configs/grpo.py:smoke", f"--config.data.source={source}",
              "--workdir", str(wd), timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    err = _lines(r.stderr)
    assert err[0] == (f"note: --workdir {str(wd)!r}: a folder name in it begins or ends with "
                      "a blank; the lines below show the path as it is"), err
    assert err[-1].startswith(f"emit_jax.train: error: {source}: no class folders"), err
    assert not wd.exists()  # a run that trained nothing leaves no workdir


def test_the_compile_cache_is_no_changed_setting(tmp_path):
    """B3w: a rerun with another ``--config.compile_cache`` (or one ``$JAX_COMPILATION_CACHE_DIR``
    overrode) was said to "continue with the new values" in the settings-changed warning: where
    compiled code is cached changes nothing trained."""
    import json

    from emit_jax import configs
    from emit_jax.training import stages

    before = configs.load("configs/grpo.py:smoke", ["compile_cache=/tmp/a"])
    (tmp_path / "results.json").write_text(json.dumps({"config": stages.config_json(before)}))
    now = configs.load("configs/grpo.py:smoke", ["compile_cache=~nosuchuser/x"])
    assert stages.run_changes(now, str(tmp_path)) == []
    seeded = configs.load("configs/grpo.py:smoke", ["compile_cache=/tmp/b", "seed=3"])
    assert stages.run_changes(seeded, str(tmp_path)) == [("seed", 0, 3)]
