import os
import pathlib

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton decides interpreter-or-compiler when a function is decorated, and loading a model
# (transformers) imports triton early: the interpreter tests need it on from the very start.
# Dispatch never picks Triton on CPU tensors by itself (test_kernels checks that with it unset).
os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny():
    from saelab.models import load_model

    return load_model("tiny", device="cpu")


@pytest.fixture(scope="session")
def small_run(tiny, tmp_path_factory):
    """One small harvest (two hooks, fp32, 6 shards, one held out) shared by the session."""
    from saelab.config import HarvestConfig
    from saelab.harvest import harvest

    out = tmp_path_factory.mktemp("run") / "small"
    cfg = HarvestConfig(hooks=["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"], out=str(out),
                        tokens=128 * 60, shard_rows=128 * 10, holdout=0.1, batch_size=8)
    stores = harvest(cfg, progress=False, model=tiny)
    return cfg, stores


@pytest.fixture(scope="session")
def mlp_pairs(tiny, tmp_path_factory):
    """The bundled model's MLP pairs (both layers), harvested once from the CLI: 16k tokens in contexts of 32."""
    from saelab.cli import main

    run = tmp_path_factory.mktemp("pairs") / "run"
    assert main(["harvest", "--pairs", "mlp", "--out", str(run), "--tokens", "16384", "--context-size", "32",
                 "--quiet"]) == 0
    return run


@pytest.fixture(scope="session")
def mlp_coders(mlp_pairs, tmp_path_factory):
    """A transcoder group and a skip-transcoder group (one per layer, equal k) on ``mlp_pairs``, from the CLI."""
    from saelab.cli import main

    root = tmp_path_factory.mktemp("coders")
    for arch in ("transcoder", "skip-transcoder"):
        assert main(["train", "--arch", arch, "--activations", str(mlp_pairs), "--out", str(root / arch), "--k", "8",
                     "--expansion", "4", "--tokens", "120000", "--batch-size", "512", "--quiet"]) == 0
    return root


@pytest.fixture(scope="session")
def clt_folder(mlp_pairs, tmp_path_factory):
    """One CLT over both MLPs of the bundled model, k 8 per layer (total L0 16), as the per-layer ``mlp_coders``."""
    from saelab.cli import main

    out = tmp_path_factory.mktemp("clt") / "clt"
    assert main(["train", "--arch", "clt", "--activations", str(mlp_pairs), "--out", str(out), "--k", "8",
                 "--expansion", "4", "--tokens", "120000", "--batch-size", "512", "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def grad_run(tiny, tmp_path_factory):
    """A harvest with gradients at two hooks (every architecture, g-SAE included, trains on it)."""
    from saelab.config import HarvestConfig
    from saelab.harvest import harvest

    out = tmp_path_factory.mktemp("gradrun") / "g"
    cfg = HarvestConfig(hooks=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], out=str(out),
                        tokens=128 * 256, shard_rows=128 * 64, holdout=0.25, batch_size=16, with_grads=True)
    return harvest(cfg, progress=False, model=tiny)


@pytest.fixture(scope="session")
def planted_store(tmp_path_factory):
    """Synthetic planted features (d=64, 256 true features, ~5 active per row)."""
    from saelab.synthetic import SyntheticConfig, write_synthetic

    out = tmp_path_factory.mktemp("planted") / "store"
    return write_synthetic(SyntheticConfig(out=str(out), d=64, n_true=256, active=5, rows=131072), progress=False)


@pytest.fixture(scope="session")
def demo_group(tiny, tmp_path_factory):
    """The demo store + TopK SAE group (saelab.demo.ensure_group), built once per test session.

    ``SAELAB_DEMO_DIR`` points at it, so notebooks and CLI subprocesses that call
    ``ensure_group()`` reuse it instead of building their own."""
    from saelab.demo import ensure_group

    root = pathlib.Path(os.environ.get("SAELAB_TEST_DEMO_DIR") or tmp_path_factory.mktemp("demo"))
    demo = ensure_group(root, progress=False, model=tiny)
    os.environ["SAELAB_DEMO_DIR"] = str(root)
    return demo


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache, offline (HF_HUB_OFFLINE): tests of saelab fetch fill it by hand
    (tests/test_hub.py's _put writes files as huggingface_hub stores them)."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def demo_sae(demo_group, tmp_path):
    """A copy of the demo's layer-1 SAE (without features.h5): tests that write eval.json or autointerp.json into
    it leave the shared group as it is."""
    import shutil

    dst = tmp_path / "sae"
    shutil.copytree(demo_group.saes["blocks.1.hook_resid_post"], dst, ignore=shutil.ignore_patterns("features.h5"))
    return dst
