"""saelab.demo.demo_root: where the demo's activations/ and runs/ go when no folder is named."""

import pathlib

from saelab.demo import demo_root


def _checkout(tmp_path: pathlib.Path) -> pathlib.Path:
    repo = tmp_path / "repo"
    (repo / "notebooks" / "deeper").mkdir(parents=True)
    (repo / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\n\n'
                                         '[project]\nname = "saelab"\nversion = "0"\n')
    return repo.resolve()


def test_subfolder_of_a_checkout_gives_the_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("SAELAB_DEMO_DIR", raising=False)
    repo = _checkout(tmp_path)
    monkeypatch.chdir(repo / "notebooks")
    assert demo_root() == repo
    monkeypatch.chdir(repo / "notebooks" / "deeper")
    assert demo_root() == repo
    monkeypatch.chdir(repo)
    assert demo_root() == repo


def test_a_folder_with_a_built_demo_counts_as_a_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("SAELAB_DEMO_DIR", raising=False)
    work = tmp_path / "work"
    (work / "runs" / "demo").mkdir(parents=True)
    (work / "runs" / "demo" / "group.json").write_text("{}")
    (work / "analysis").mkdir()
    monkeypatch.chdir(work / "analysis")
    assert demo_root() == work.resolve()


def test_another_project_is_not_a_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("SAELAB_DEMO_DIR", raising=False)
    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    (other / "pyproject.toml").write_text('[project]\nname = "not-saelab"\n\n[tool.x]\nname = "saelab"\n')
    monkeypatch.chdir(other / "sub")
    assert demo_root() == (other / "sub").resolve()


def test_the_environment_variable_wins(tmp_path, monkeypatch):
    repo = _checkout(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv("SAELAB_DEMO_DIR", str(elsewhere))
    monkeypatch.chdir(repo / "notebooks")
    assert demo_root() == elsewhere.resolve()


def test_the_argument_wins_over_everything(tmp_path, monkeypatch):
    repo = _checkout(tmp_path)
    monkeypatch.setenv("SAELAB_DEMO_DIR", str(tmp_path / "env"))
    monkeypatch.chdir(repo / "notebooks")
    assert demo_root(tmp_path / "arg") == (tmp_path / "arg").resolve()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert demo_root("~/x") == (tmp_path / "x").resolve()


def test_outside_any_checkout_gives_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("SAELAB_DEMO_DIR", raising=False)
    plain = tmp_path / "plain" / "sub"
    plain.mkdir(parents=True)
    monkeypatch.chdir(plain)
    assert demo_root() == plain.resolve()
