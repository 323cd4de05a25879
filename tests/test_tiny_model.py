"""The committed tiny model has learned real structure (checked on the committed weights)."""

import json

import pytest
import torch

from saelab.tiny import train_tiny as tt

pytestmark = pytest.mark.tl3


@pytest.fixture(scope="module")
def hf_tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tt.HERE).eval()
    tok = AutoTokenizer.from_pretrained(tt.HERE)
    return model, tok


def test_files_and_size():
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"]:
        assert (tt.HERE / name).exists(), name
    assert (tt.HERE / "model.safetensors").stat().st_size <= 20 * 2**20
    cfg = json.loads((tt.HERE / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and 2 <= cfg["n_layer"] <= 4 and 128 <= cfg["n_embd"] <= 256
    assert cfg["vocab_size"] <= 8192


def test_bos_eos(hf_tiny):
    _, tok = hf_tiny
    assert tok.bos_token_id is not None and tok.eos_token_id is not None


def test_heldout_loss_below_unigram_entropy(hf_tiny):
    model, tok = hf_tiny
    train = tt.encode_stream(tok, tt.read_paragraphs(tt.HERE / "corpus" / "train"))
    held = tt.encode_stream(tok, tt.read_paragraphs(tt.HERE / "corpus" / "heldout"))
    h_uni = tt.unigram_entropy(torch.cat([train, held]), len(tok))
    loss = tt.heldout_loss(model, held, 128, tok.bos_token_id)
    assert loss <= 0.75 * h_uni, (loss, h_uni)


def test_induction(hf_tiny):
    model, tok = hf_tiny
    first, second = tt.induction_losses(model, len(tok), tok.bos_token_id)
    assert second <= first - 1.0, (first, second)


def test_train_script_runs(tmp_path):
    final = tt.main(["--steps", "4", "--copy-steps", "2", "--eval-every", "4", "--batch", "2", "--ctx", "128", "--vocab", "300",
                     "--d-model", "32", "--heads", "2", "--out", str(tmp_path)])
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "tokenizer.json").exists()
    assert final["heldout_loss"] > 0


def test_load_model_takes_a_torch_device_and_names_a_bad_one():
    """load_model(device=torch.device("cpu")) works (it was an AttributeError on .startswith); an
    unknown device string is a one-line SaelabError, not an error from deep inside the load."""
    import pytest
    import torch

    from saelab.device import pick_device
    from saelab.errors import SaelabError
    from saelab.models import load_model

    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(SaelabError, match="unknown device 'gpu'"):
        pick_device("gpu")
    with pytest.raises(SaelabError, match="device must be a string"):
        load_model("tiny", device=1.5)
    if not torch.cuda.is_available():  # an int is a CUDA index, as in torch
        with pytest.raises(SaelabError, match="--device cuda:0 asked for, but CUDA is not available"):
            load_model("tiny", device=0)
    else:
        assert pick_device(0) == torch.device("cuda:0")
    model = load_model("tiny", device=torch.device("cpu"))
    assert next(model.parameters()).device.type == "cpu"


def test_dtype_strings_and_sae_load_devices_are_taken_or_named(tmp_path):
    """load_model(dtype="bfloat16") works as in TransformerLens (was a TypeError from .to); SAE.load
    with device "cuda" on a machine without CUDA, or a misspelt device, is a one-line SaelabError
    (were a pin_memory RuntimeError and a SafetensorError)."""
    import pytest
    import torch

    from saelab.errors import SaelabError
    from saelab.models import load_model
    from saelab.sae.base import SAE

    model = load_model("tiny", device="cpu", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(SaelabError, match="unknown dtype 'int8'"):
        load_model("tiny", device="cpu", dtype="int8")
    sae_dir = tmp_path / "sae"  # a saved SAE is all this needs (the demo group costs minutes in the TL 3.9 env)
    SAE.create("topk", d_in=128, d_sae=256, k=8, hook_name="blocks.1.hook_resid_post").save(sae_dir)
    assert SAE.load(sae_dir, device=torch.device("cpu")).W_dec.device.type == "cpu"
    with pytest.raises(SaelabError, match="unknown device 'gpu'"):
        SAE.load(sae_dir, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(SaelabError, match="CUDA is not available"):
            SAE.load(sae_dir, device="cuda")
