"""The mkdocs hooks in docs/hooks/: benchmark results, the CLI reference, notebook figures, the model card."""

import importlib.util
import json
import pathlib
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _hook(name):
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", ROOT / "docs" / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _hook("benchmarks")


def _sample(load_after=(1.9, 1.2, 0.6), cores=8):
    return {
        "name": "bench_train", "title": "Training step rate per architecture",
        "description": "The bare step against the **GEMM limit**.",
        "command": "python benchmarks/bench_train.py --d-in 128,512",
        "env": {"date": "2026-12-06T21:30:00+00:00", "git_sha": "abc1234def5678", "git_dirty": True,
                "cpu": "AMD EPYC 7B13", "cores": cores, "load_before": [0.3, 0.2, 0.1], "load_after": list(load_after),
                "python": "3.11.7", "torch": "2.13.0", "triton": None, "threads": 2, "device": "cpu"},
        "tables": [{"title": "Step rate", "columns": ["d_in", "arch", "tokens/s", "fraction of limit"],
                    "rows": [[128, "topk", 123456.0, 0.5712], [512, "relu", 2882.4, 0.1], [16384, "a|b", None, 0.06]],
                    "note": "batch 4096, 16×"}],
    }


def test_a_result_renders_title_tables_command_and_environment(bench, tmp_path):
    (tmp_path / "bench_train.json").write_text(json.dumps(_sample()))
    md = bench.render_marker("bench_train", tmp_path)
    assert "## Training step rate per architecture" in md
    assert "The bare step against the **GEMM limit**." in md
    assert "### Step rate" in md
    assert "| d_in | arch | tokens/s | fraction of limit |" in md
    assert "|--:|---|--:|--:|" in md  # numbers right-aligned, text left
    assert "| 128 | topk | 123,456 | 0.571 |" in md
    assert "| 512 | relu | 2,882 | 0.1 |" in md
    assert "| 16,384 | a\\|b | — | 0.06 |" in md  # a pipe in a cell is escaped, a missing value is a dash
    assert "batch 4096, 16×" in md
    assert "Command: `python benchmarks/bench_train.py --d-in 128,512`" in md
    assert "2026-12-06 21:30 UTC" in md and "`abc1234def`" in md and "uncommitted changes" in md
    assert "AMD EPYC 7B13, 8 cores, 2 torch threads, device cpu" in md
    assert "torch 2.13.0" in md and "no triton" in md
    assert "loaded machine" not in md  # load 1.9 on 8 cores


def test_a_loaded_machine_gets_a_warning(bench, tmp_path):
    (tmp_path / "bench_train.json").write_text(json.dumps(_sample(load_after=(3.5, 2.0, 1.0), cores=2)))
    md = bench.render_marker("bench_train", tmp_path)
    assert '!!! warning "Taken on a loaded machine"' in md
    assert "0.3 before and 3.5 after" in md and "on 2 cores" in md


def test_a_missing_result_is_a_note_naming_the_command(bench, tmp_path):
    md = bench.render_marker("bench_load", tmp_path)
    assert md.startswith('!!! note "Not measured yet"')
    assert "Not measured yet: run `python benchmarks/bench_load.py`" in md
    assert "benchmarks/results/bench_load.json" in md
    md = bench.render_marker("bench_encode_gpu", tmp_path, "bash benchmarks/device_check.sh")
    assert "run `bash benchmarks/device_check.sh`" in md


def test_markers_are_replaced_in_a_page(bench, tmp_path):
    root = tmp_path / "repo"
    (root / "benchmarks" / "results").mkdir(parents=True)
    (root / "benchmarks" / "results" / "bench_train.json").write_text(json.dumps(_sample()))
    bench.on_config(types.SimpleNamespace(config_file_path=str(root / "mkdocs.yml")))
    page = ("# Training\n\nProse.\n\n<!-- bench: bench_train -->\n\n"
            "<!-- bench: bench_vs_saelens | make bench-venv && python x.py -->\n\n<!-- bench-index -->\n")
    md = bench.on_page_markdown(page, None, None, None)
    assert "<!-- bench" not in md
    assert "# Training\n\nProse." in md and "| 128 | topk | 123,456 | 0.571 |" in md
    assert "run `make bench-venv && python x.py`" in md
    assert "| `bench_train` | Training step rate per architecture | 2026-12-06 21:30 UTC |" in md


def test_a_broken_result_file_warns(bench, tmp_path, caplog):
    (tmp_path / "bench_x.json").write_text("{not json")
    assert bench.load_result("bench_x", tmp_path) is None
    assert "not readable JSON" in caplog.text


def test_numbers(bench):
    f = bench.fmt
    assert [f(0), f(3), f(16384), f(123456.0), f(1234.6), f(456.7), f(12.345), f(0.0851234), f(16.0)] == \
           ["0", "3", "16,384", "123,456", "1,235", "457", "12.3", "0.0851", "16"]
    assert f(1234.5, "speed-up ratio") == "1,230"  # a ratio keeps 3 significant digits
    assert f(None) == "—" and f(float("nan")) == "—" and f(True) == "yes"
    assert bench.sig3(999.7) == "1,000" and bench.sig3(0.00001234) == "1.23e-05"


def test_the_rendered_markdown_is_html(bench, tmp_path):
    markdown = pytest.importorskip("markdown")
    (tmp_path / "bench_train.json").write_text(json.dumps(_sample(load_after=(3.5, 2, 1), cores=2)))
    html = markdown.markdown(bench.render_marker("bench_train", tmp_path) + "\n" + bench.render_missing("bench_load"),
                             extensions=["tables", "admonition"])
    assert html.count("<table>") == 1 and html.count("<tr>") == 4
    assert 'class="admonition warning"' in html and 'class="admonition note"' in html


def test_the_cli_reference_lists_every_subcommand():
    cli = _hook("cli_reference")
    from saelab.cli import build_parser

    md = cli.render_cli(build_parser())
    for name in ["harvest", "train", "eval", "synthetic", "analyze", "export", "compare", "fetch", "app", "steer",
                 "circuit", "heads", "demo"]:
        assert f"## `saelab {name}`" in md, name
    assert "usage: saelab harvest" in md and "| `--hook " in md and "| `--version` |" in md
    assert "%(default)" not in md and "%%" not in md
    fields = cli.render_config_fields("saelab.config.TrainConfig")
    assert fields.startswith("| field | default | flag | what it is |") and "| `batch_size` | `4096` | `--batch-size` |" in fields


def test_cli_text_escaping():
    cli = _hook("cli_reference")
    assert cli.md_text("a <hook> | *glob* `x | *y*`") == "a &lt;hook&gt; \\| \\*glob\\* `x | *y*`"


def test_notebook_figures_get_an_html_form():
    pytest.importorskip("mkdocs")
    nb_hook = _hook("notebooks")
    figure = {"data": [{"type": "bar", "x": ["a"], "y": [1]}], "layout": {"height": 300, "title": {"text": "</script>"}}}
    nb = {"cells": [{"cell_type": "code", "outputs": [
        {"output_type": "display_data", "data": {"application/vnd.plotly.v1+json": figure, "text/plain": "Figure"}},
        {"output_type": "stream", "text": "hi"}]}]}
    assert nb_hook.add_plotly_html(nb) == 1
    data = nb["cells"][0]["outputs"][0]["data"]
    assert list(data) == ["text/html"]
    html = data["text/html"]
    assert 'id="plotly-figure-0"' in html and "height:300px" in html and 'Plotly.newPlot("plotly-figure-0"' in html
    assert "</script>\"" not in html and "<\\/script>" in html  # the figure cannot close its own script tag


def test_the_model_card_comes_from_the_shipped_files():
    tiny = _hook("tiny_model")
    md = tiny.render_card(ROOT / "saelab" / "tiny")
    final = json.loads((ROOT / "saelab" / "tiny" / "train_log.json").read_text())["final"]
    assert f"{final['heldout_loss']:.3f} nats" in md and f"{final['induction_second']:.3f} nats" in md
    assert "| layers | 2 |" in md and "| vocabulary | 4,096 |" in md


def test_the_import_rules_are_drawn_from_pyproject():
    arch = _hook("architecture")
    contracts = arch.load_contracts(ROOT / "pyproject.toml")
    layers = arch.render_layers(contracts)
    assert layers.count("```mermaid") == 1 and '["cli"]' in layers and "-->" in layers
    table = arch.render_contracts(contracts)
    assert table.startswith("| contract | modules | rule |") and "may not import" in table
    assert arch.render_layers({}) == "No layers contract is declared."


def test_the_formats_page_gets_a_table_per_schema():
    """Every <!-- schema: NAME --> of the formats page names a schema the readers use, and renders its fields
    with their types and ranges (a schema change shows on the page)."""
    import re

    from saelab.store.manifest import MANIFEST_SCHEMA

    hook = _hook("schemas")
    page = (ROOT / "docs" / "reference" / "formats.md").read_text(encoding="utf-8")
    names = re.findall(r"<!-- schema: (.+?) -->", page)
    assert set(names) == set(hook.schemas()), names
    out = hook.on_page_markdown(page, None, None, None)
    assert "<!-- schema:" not in out and "no schema named" not in out
    assert "| `shards[i].file` | text | a name inside its folder" in out
    assert "| `dead_frac` | number | ≥ 0, ≤ 1 |" in out and "| `fvu` | number |" in out
    assert "| `hooks[hook]` | text |" in out
    rows = hook.rows(MANIFEST_SCHEMA)
    assert {r[0] for r in rows if r[3] == "yes"} >= set(MANIFEST_SCHEMA["required"])
