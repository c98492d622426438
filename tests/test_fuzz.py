"""Property-based fuzzing of what mom reads from users: safetensors headers, model configs, recipes
and text data. Every failure must be a MomError/UsageError with a one-line message (the CLI prints
it as `mom: error: ...`, exit 1 or 2), never another exception."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mom_cli.errors import MomError

FAST = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64), st.floats(allow_nan=True), st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12
)


def only_mom_errors(fn) -> None:
    try:
        fn()
    except MomError as e:
        assert "\n" not in str(e) and len(str(e)) < 2000, str(e)


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def fresh(folder: Path, name: str) -> Path:
    d = folder / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    return d


# ----------------------------------------------------------------------------- safetensors headers

dtypes = st.sampled_from(["F32", "F16", "BF16", "I32", "I64", "U8", "BOOL", "F8_E4M3", "XX", ""])
entries = st.fixed_dictionaries(
    {
        "dtype": dtypes | json_scalars,
        "shape": st.lists(st.integers(-3, 2**40), max_size=3) | json_scalars,
        "data_offsets": st.lists(st.integers(-8, 2**40), min_size=0, max_size=3) | json_scalars,
    }
)
headers = st.dictionaries(st.text(min_size=1, max_size=6), entries | json_values, max_size=4)


@FAST
@given(header=headers, data=st.binary(max_size=256), length_delta=st.integers(-16, 16) | st.just(0) | st.just(2**40))
def test_safetensors_header_reader(folder, header, data, length_delta):
    from mom_cli.io.tensorio import SafetensorsReader

    d = fresh(folder, "st")
    raw = json.dumps(header).encode()
    n = len(raw) + length_delta if length_delta != 2**40 else 2**40
    (d / "model.safetensors").write_bytes(struct.pack("<Q", max(n, 0)) + raw + data)

    def read():
        reader = SafetensorsReader(d)
        for k in sorted(reader.keys()):
            reader.shape(k), reader.dtype(k), reader.get(k)

    only_mom_errors(read)


# ----------------------------------------------------------------------------- configs

CONFIG_KEYS = [
    "model_type",
    "n_embd",
    "n_layer",
    "n_head",
    "vocab_size",
    "n_positions",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "auto_map",
    "architectures",
    "tie_word_embeddings",
    "rope_parameters",
    "blocks",
    "family",
    "bottom_layers",
]
configs = st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values | st.integers(-5, 10**10), max_size=6) | json_values
model_types = st.sampled_from(["gpt2", "llama", "mom", "evil", None])


@FAST
@given(config=configs, model_type=model_types, raw=st.none() | st.binary(max_size=40))
def test_config_loader(folder, config, model_type, raw):
    from mom_cli.io.sources import load_config

    d = fresh(folder, "cfg")
    if isinstance(config, dict) and model_type is not None:
        config["model_type"] = model_type
    (d / "config.json").write_bytes(raw if raw is not None else json.dumps(config).encode())
    only_mom_errors(lambda: load_config(d))


# ----------------------------------------------------------------------------- recipes

yaml_bits = st.sampled_from(
    [
        "steps:",
        "  - command: decompose",
        "  - command: prune",
        "    keep-mha: 50%",
        "vars:",
        "  x: 1",
        "output: o",
        "  - command: plot routing",
        "    output: ../x.png",
        "&a [1]",
        "*a",
        "!!python/object:os.system",
        "${x}",
        "  - command: export",
        "    format: safetensors",
        "name: n",
        "description:",
        "- - -",
        "{",
        "'",
        "\t",
        "",
        "  source: ${nope}",
        "    data: ${x}",
        "    top-k: -1",
        "    steps: '2'",
        "  - 3",
        "  - command: 7",
    ]
)


@FAST
@given(lines=st.lists(yaml_bits | st.text(max_size=12), max_size=10), sets=st.lists(st.text(max_size=10), max_size=2))
def test_recipe_loader(folder, lines, sets):
    import typer

    from mom_cli.cli import recipes
    from mom_cli.cli.app import app

    specs = recipes.command_specs(typer.main.get_command(app))

    d = fresh(folder, "recipe")
    path = d / "r.yaml"
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogatepass"))  # lone surrogates: bad UTF-8

    def load():
        recipe = recipes.load(str(path))
        recipes.resolve(recipe, recipes.parse_sets(sets), specs)

    only_mom_errors(load)


# ----------------------------------------------------------------------------- text data


@pytest.fixture(scope="module")
def tokenizer(models_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models_dir / "gpt2", trust_remote_code=False)


@FAST
@given(
    body=st.binary(max_size=300),
    suffix=st.sampled_from([".txt", ".jsonl", ".parquet", ".json"]),
    cap=st.none() | st.integers(-1, 64),
)
def test_data_loader(folder, tokenizer, body, suffix, cap):
    from mom_cli.io.text import token_stream

    d = fresh(folder, "data")
    (d / f"x{suffix}").write_bytes(body)
    only_mom_errors(lambda: token_stream(str(d / f"x{suffix}"), tokenizer, cap))
