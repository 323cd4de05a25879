"""One validator per file format (saelab.schema): every reader refuses a damaged file with one line naming the file
and the field, and what it accepts has the types its consumers use. The property tests damage a valid file of
each format at a random place with a random JSON value (or an HDF5 attribute / dataset) and drive the reader and
a consumer; the CLI test feeds every numeric flag of every command values outside its type."""

import argparse
import json
import math
import pathlib
import shutil

import pytest
import torch

from saelab.errors import SaelabError
from saelab.sae import SAE

pytest.importorskip("hypothesis")  # the [dev] extra has it; the TransformerLens 3.9 environment (make test-tl3) not
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

HOOK = "blocks.0.hook_resid_post"
_JSON = st.recursive(st.none() | st.booleans() | st.integers(min_value=-(10**20), max_value=10**20)
                     | st.floats() | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                     max_leaves=8)
_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                       HealthCheck.too_slow])


def _paths(doc, prefix=()):
    """Every place in a JSON document: the paths of its values, containers included."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


def _damage(doc, path, value, drop: bool):
    """A copy of ``doc`` with the value at ``path`` replaced by ``value`` (or removed, with ``drop``)."""
    doc = json.loads(json.dumps(doc))
    if not path:
        return value
    *up, last = path
    parent = doc
    for p in up:
        parent = parent[p]
    if drop and isinstance(parent, dict):
        del parent[last]
    else:
        parent[last] = value
    return doc


# ----------------------------------------------------------------------------- the checker
def test_types_are_those_of_the_data():
    from saelab.schema import NUMBER, POSITIVE, problem

    assert problem(3, POSITIVE) is None and problem(3.5, NUMBER) is None
    for v in (True, 1.0, "1", None, 0):
        assert problem(v, POSITIVE), v
    for v in (math.nan, math.inf, -math.inf, True, "1"):
        assert "is not a finite number" in problem(v, NUMBER) or "is not" in problem(v, NUMBER), v
    assert problem(math.nan, NUMBER) == "the top level: nan is not a finite number"


def test_config_schemas_follow_their_fields():
    """The schema of each config comes from its fields: a default config holds to it, and a NaN in any real
    field, a text in any whole-number field and an off-choice value are each refused, naming the field."""
    import dataclasses
    import typing

    from saelab.config import HarvestConfig, SAEConfig, TrainConfig
    from saelab.schema import problem

    for cls in (HarvestConfig, SAEConfig, TrainConfig):
        doc = cls().to_dict()
        assert problem(doc, cls.json_schema()) is None
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kinds = typing.get_args(hints[f.name]) or (hints[f.name],)
            bad = math.nan if float in kinds else "x" if int in kinds else None
            if f.metadata.get("choices"):
                bad = "not-a-choice"
            if bad is None:
                continue
            why = problem({**doc, f.name: bad}, cls.json_schema())
            assert why and why.startswith(f"{f.name}:"), (cls.__name__, f.name, why)


# ----------------------------------------------------------------------------- JSON formats
@pytest.fixture(scope="module")
def formats(small_run, tmp_path_factory):
    """A valid file of each JSON format, in folders the readers take."""
    from saelab.store import ActivationStore

    _, stores = small_run
    root = tmp_path_factory.mktemp("formats")
    torch.manual_seed(0)
    sae = SAE.create("topk", d_in=128, d_sae=64, k=4, hook_name=HOOK, model_name="tiny").save(root / "sae")
    store = ActivationStore(stores[HOOK])
    docs = {
        "cfg.json": json.loads((sae / "cfg.json").read_text()),
        "train.json": {"train": {"activations": str(store.path), "out": str(sae), "tokens": 4096, "lr": None},
                       "sae": {"arch": "topk", "k": 4, "d_in": 128}, "store": str(store.path),
                       "store_identity": {"model": "tiny", "hook": HOOK, "d_in": 128, "n_tokens": 100,
                                          "shards_sha256": "ab"}, "n_steps": 4, "world_size": 1, "scale": 0.9,
                       "done": True, "epochs": 1.5},
        "eval.json": {"split": "holdout", "rows": 10, "fvu": 0.1, "explained_variance": 0.9, "l0": 4.0,
                      "dead_frac": 0.1, "dense_frac": 0.0, "ce_clean": 3.0, "ce_sae": 3.2, "ce_zero_ablation": 5.0,
                      "ce_loss_recovered": 0.9, "kl": 0.1, "eval_tokens": 99, "ce_contexts": 4, "ce_split": "holdout"},
        "labels.json": {"3": "the letter e", "12": "names"},
        "source.json": {"repo_id": "org/repo", "subfolder": "layer_0", "revision": None, "commit": "abc",
                        "format": "saelens", "fetched": "2026-01-01T00:00:00+00:00"},
        "group.json": {"model": "tiny", "hooks": {HOOK: "sae"}},
        "manifest.json": json.loads((store.path / "manifest.json").read_text()),
    }
    return root, sae, store.path, docs


def _read(fmt, root: pathlib.Path, sae: pathlib.Path, store: pathlib.Path, doc, tmp: pathlib.Path):
    """Write ``doc`` as the file ``fmt`` into a copy of its folder under ``tmp``, then read it as saelab does and
    use what was read as its consumers do; returns the path written."""
    from saelab.analysis.features import load_labels
    from saelab.cli.common import eval_line
    from saelab.config import SAEConfig, TrainConfig
    from saelab.layout import read_eval, read_group, read_source, read_train_info
    from saelab.store import ActivationStore
    from saelab.targets import sae_folders

    text = json.dumps(doc, allow_nan=True)
    if fmt == "manifest.json":
        folder = tmp / "store"
        shutil.copytree(store, folder)
        (folder / fmt).write_text(text)
        s = ActivationStore(folder)
        assert s.d_in >= 1 and all("/" not in sh["file"] for sh in s.manifest["shards"])
        return folder / fmt
    folder = tmp / "sae"
    shutil.copytree(sae, folder)
    (folder / fmt).write_text(text)
    if fmt == "cfg.json":
        loaded = SAE.load(folder)
        assert loaded.d_in >= 1 and loaded.d_sae >= 1
    elif fmt == "train.json":
        info = read_train_info(folder, "train again")
        TrainConfig.from_dict(info.get("train", {})).check_numbers()
        SAEConfig.from_dict(info.get("sae", {})).check_numbers()
        assert isinstance(info.get("store", ""), str)
    elif fmt == "eval.json":
        assert isinstance(eval_line(read_eval(folder)), str)
    elif fmt == "labels.json":
        labels = load_labels(folder)
        assert all(isinstance(k, int) and 0 <= k < 64 and isinstance(v, str) for k, v in labels.items())
    elif fmt == "source.json":
        src = read_source(folder)
        assert all(isinstance(src.get(k, ""), str) for k in ("format", "fetched", "path", "repo_id", "subfolder"))
    elif fmt == "group.json":
        group = tmp / "group"
        group.mkdir()
        shutil.move(folder, group / "sae")
        shutil.move(group / "sae" / fmt, group / fmt)
        model, hooks = read_group(group)
        assert model is None or isinstance(model, str)
        for p in hooks.values():
            assert p.parent == group
        try:
            sae_folders(group)
        except SaelabError as e:  # the group names a folder it does not have: refused, naming it
            assert str(group) in str(e)
        return group / fmt
    return folder / fmt


_FORMATS = ["cfg.json", "train.json", "eval.json", "labels.json", "source.json", "group.json", "manifest.json"]


@settings(max_examples=140, **_SETTINGS)
@given(st.sampled_from(_FORMATS), st.data())
def test_every_json_format_takes_any_damage_without_a_traceback(formats, tmp_path_factory, fmt, data):
    """140 examples (20 per format): a value of a valid file replaced by any JSON value (NaN and ±inf among them)
    or a key removed; its reader accepts it, with the types its consumer uses, or refuses it with one line naming
    the file."""
    root, sae, store, docs = formats
    doc = docs[fmt]
    path = data.draw(st.sampled_from(list(_paths(doc))), label="where")
    damaged = _damage(doc, path, data.draw(_JSON, label="value"), drop=data.draw(st.booleans(), label="drop"))
    tmp = tmp_path_factory.mktemp("d")
    try:
        _read(fmt, root, sae, store, damaged, tmp)
    except SaelabError as e:
        assert len(str(e).splitlines()) == 1 and str(tmp) in str(e), str(e)


@pytest.mark.parametrize("fmt,change,needle", [
    ("eval.json", {"fvu": "x"}, "eval.json is not a valid evaluation: fvu: 'x' is not a finite number"),
    ("eval.json", {"l0": -1}, "l0: -1 is less than the minimum of 0"),
    ("train.json", {"n_steps": 1.5}, "train.json is not a valid run record: n_steps: 1.5 is not a whole number"),
    ("train.json", {"train": {"lr": "fast"}}, "train.lr: 'fast' is not a finite number"),
    ("source.json", {"format": 3}, "source.json is not a valid source record: format: 3 is not text"),
    ("labels.json", {"99": "beyond"}, "labels.json is not a valid labels file: \"99\" is not a latent of this SAE"),
    ("group.json", {"hooks": {HOOK: ".."}}, "hooks[\"blocks.0.hook_resid_post\"]: '..' is not a name inside"),
])
def test_a_damaged_field_is_named(formats, tmp_path, fmt, change, needle):
    root, sae, store, docs = formats
    with pytest.raises(SaelabError) as e:
        _read(fmt, root, sae, store, {**docs[fmt], **change}, tmp_path)
    assert needle in str(e.value), str(e.value)


def test_writers_hold_to_the_readers_schema(tmp_path):
    """eval.json and circuit files are checked against their schema before they are written: a NaN metric is an
    error, not a file; an undefined CE-loss recovered is null and printed as undefined."""
    from saelab.analysis.circuits.file import write_circuit
    from saelab.cli.common import eval_line
    from saelab.layout import check_eval

    ev = {"fvu": 0.1, "l0": 4.0, "dead_frac": 0.0, "dense_frac": 0.0}
    with pytest.raises(SaelabError, match="fvu: nan is not a finite number"):
        check_eval({**ev, "fvu": math.nan}, tmp_path / "eval.json")
    line = eval_line(check_eval({**ev, "ce_clean": 3.0, "ce_sae": 3.0, "ce_zero_ablation": 3.0,
                                 "ce_loss_recovered": None, "kl": 0.0}, tmp_path / "eval.json"))
    assert "CE-loss recovered undefined" in line
    with pytest.raises(SaelabError, match="is not a valid circuit file"):
        write_circuit({"kind": "sparse_feature_circuit", "format_version": 1, "nodes": "many"}, tmp_path / "c.json")
    assert not (tmp_path / "c.json").exists()


# ----------------------------------------------------------------------------- features.h5
@pytest.fixture(scope="module")
def analysed(small_run, tmp_path_factory):
    """A small SAE with its features.h5 (no model: no logit datasets)."""
    from saelab.analysis.features.build import analyze

    _, stores = small_run
    torch.manual_seed(1)
    sae = SAE.create("topk", d_in=128, d_sae=64, k=4, hook_name=HOOK, model_name="tiny")
    folder = sae.save(tmp_path_factory.mktemp("an") / "sae")
    analyze(folder, stores[HOOK], tokens=2048, top=3, progress=False)
    return folder


# text without NUL: HDF5 cannot store an attribute string with one (h5py refuses it before saelab could read it)
_ATTR_VALUES = st.one_of(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(),
                         st.text(st.characters(exclude_characters="\x00"), max_size=12), st.booleans())


@settings(max_examples=60, **_SETTINGS)
@given(st.data())
def test_features_file_takes_any_damage_without_a_traceback(analysed, tmp_path_factory, data):
    """60 examples: features.h5 with one attribute set to any scalar, one dataset removed or replaced by one of
    another shape or kind, or its bytes cut short: FeatureDB opens it and reads a card and a token search, or
    refuses it with one line naming the file."""
    import h5py
    import numpy as np

    from saelab.analysis.features import FeatureDB

    folder = tmp_path_factory.mktemp("f") / "sae"
    shutil.copytree(analysed, folder)
    path = folder / "features.h5"
    with h5py.File(path, "r") as f:
        attrs, names = sorted(f.attrs), sorted(f)
    how = data.draw(st.sampled_from(["attr", "drop", "reshape", "cut"]), label="how")
    if how == "cut":
        raw = path.read_bytes()
        path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1), label="keep")])
    else:
        with h5py.File(path, "a") as f:
            if how == "attr":
                f.attrs[data.draw(st.sampled_from(attrs), label="attr")] = data.draw(_ATTR_VALUES, label="value")
            else:
                name = data.draw(st.sampled_from(names), label="dataset")
                del f[name]
                if how == "reshape":
                    shape = tuple(data.draw(st.lists(st.integers(0, 70), min_size=1, max_size=3), label="shape"))
                    kind = data.draw(st.sampled_from([np.int32, np.float32, np.uint8]), label="kind")
                    f[name] = np.zeros(shape, kind)
    try:
        with FeatureDB(folder) as db:
            card = db.card(data.draw(st.integers(0, db.d_sae - 1), label="latent"))
            assert isinstance(card.density, float)
            db.by_token("the")
    except SaelabError as e:
        assert len(str(e).splitlines()) == 1 and str(path) in str(e), str(e)


# ----------------------------------------------------------------------------- every numeric flag
def _numeric_flags():
    from saelab.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = []
    for name, p in sub.choices.items():
        required = [a.option_strings[0] for a in p._actions if a.required and a.option_strings]
        for a in p._actions:
            if a.type in (int, float) and a.option_strings:
                flags.append((name, tuple(required), a.option_strings[0], a.type))
    return flags


_FLAGS = _numeric_flags()
_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=8)


def _not_a(kind, text: str) -> bool:
    try:
        kind(text)
    except ValueError:
        return True
    return False


@st.composite
def _bad_value(draw, kind):
    """A value no flag of type ``kind`` takes: text that is not one, a whole number beyond 2^62, a non-finite real."""
    if kind is int:
        return draw(st.one_of(_TEXT.filter(lambda t: _not_a(int, t)),
                              st.integers(min_value=2**62 + 1).map(str), st.integers(max_value=-(2**62) - 1).map(str),
                              st.sampled_from(["1.5", "1e3", "nan", "0x10"])))
    return draw(st.one_of(_TEXT.filter(lambda t: _not_a(float, t)), st.sampled_from(["nan", "inf", "-inf", "1e999"])))


@pytest.mark.timeout(300)
@settings(max_examples=250, **_SETTINGS)
@given(st.sampled_from(_FLAGS), st.data())
def test_every_numeric_flag_refuses_values_outside_its_type(capsys, tmp_path_factory, flag, data):
    """250 examples over the numeric flags of every command (each command's parser lists them): a value outside the flag's type is one
    line naming the flag, exit 2, before anything runs or is written."""
    from saelab.cli import main

    command, required, name, kind = flag
    value = data.draw(_bad_value(kind), label="value")
    tmp = tmp_path_factory.mktemp("flag")
    argv = [command, *[x for r in required for x in (r, str(tmp / r.strip("-")))], f"{name}={value}"]
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and name in err, (argv, err)
    assert list(tmp.iterdir()) == [], (argv, list(tmp.iterdir()))
