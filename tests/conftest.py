import os
import pathlib

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
