"""Command inputs that must be refused before anything runs: one line each, never a silent default."""

import pytest


@pytest.mark.parametrize("host", ["", "   "])
def test_app_refuses_an_empty_host(host, tmp_path, capsys):
    """An empty --host made streamlit serve on every interface (0.0.0.0), though the help promises 127.0.0.1."""
    from saelab.cli import main
    from saelab.sae.base import SAE

    SAE.create("topk", d_in=8, d_sae=16, k=2, hook_name="blocks.0.hook_resid_post", model_name="tiny").save(tmp_path)
    assert main(["app", "--sae", str(tmp_path), "--host", host, "--port", "8599"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--host {host!r} is empty: pass an address" in err and len(err.splitlines()) == 1, err
