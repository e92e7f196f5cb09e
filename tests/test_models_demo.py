"""The demo models: built once per test session, loaded with transformers, deterministic, trained."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.models import demo
from backpropagate.models.demo import (
    BUILT_NAMES,
    DEMO_NAMES,
    MARKER,
    corpus_documents,
    corpus_token_stream,
    is_built,
    make_demo_models,
    resolve_model,
    sample_windows,
)
from backpropagate.models.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
HF_FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    MARKER,
)


@pytest.fixture(scope="session")
def demo_models(home: Path) -> dict[str, Path]:
    """Both demo models in the session's home (other test modules reuse them)."""
    return make_demo_models()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _weights(folder: Path) -> str:
    return _sha(folder / "model.safetensors")


def test_both_models_are_complete_hf_folders(demo_models, home):
    assert set(demo_models) == set(BUILT_NAMES)
    for name, folder in demo_models.items():
        assert folder == home / "models" / name
        for file in HF_FILES:
            assert (folder / file).is_file(), f"{name} lacks {file}"
        assert is_built(folder)
    leftovers = [p.name for p in (home / "models").iterdir() if ".partial-" in p.name or ".old-" in p.name]
    assert leftovers == []


@pytest.mark.parametrize("name,model_type", [("demo-llama", "llama"), ("demo-qwen2", "qwen2")])
def test_architecture_and_gguf_friendly_sizes(demo_models, name, model_type):
    from transformers import AutoConfig

    folder = demo_models[name]
    config = AutoConfig.from_pretrained(folder)
    tok = load_tokenizer(folder)
    assert config.model_type == model_type
    # K-quants need every weight's input width to be a multiple of 256.
    assert config.hidden_size % 256 == 0 and config.intermediate_size % 256 == 0
    assert config.num_attention_heads % config.num_key_value_heads == 0
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    assert config.vocab_size == len(tok)
    assert config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )


def test_qwen2_has_learned_qkv_biases_llama_has_none(demo_models):
    from safetensors.torch import load_file

    llama = load_file(demo_models["demo-llama"] / "model.safetensors")
    qwen = load_file(demo_models["demo-qwen2"] / "model.safetensors")
    assert not any(k.endswith(".bias") for k in llama)
    biases = {k: v for k, v in qwen.items() if k.endswith(".bias")}
    assert sorted({k.split(".")[-2] for k in biases}) == ["k_proj", "q_proj", "v_proj"]
    # Started at zero, then trained: every bias moved.
    assert all(v.abs().max() > 1e-4 for v in biases.values())
    # Shared weights moved away from the Llama it started from.
    key = "model.layers.0.mlp.down_proj.weight"
    assert not llama[key].equal(qwen[key])


def _corpus_words() -> set[str]:
    texts, chats = corpus_documents()
    words = " ".join(texts + [m["content"] for c in chats for m in c])
    return set(re.findall(r"[A-Za-z]+", words.lower()))


@pytest.mark.parametrize("name", BUILT_NAMES)
def test_loads_and_generates_corpus_like_text(demo_models, name):
    import torch
    from transformers import AutoModelForCausalLM

    folder = demo_models[name]
    tok = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tok("Once upon a time,", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    words = re.findall(r"[A-Za-z]+", text.lower())
    assert len(words) >= 8
    # Trained on the corpus: (nearly) every generated word is an English word from it.
    known = _corpus_words()
    assert sum(w in known for w in words) / len(words) >= 0.9, text


@pytest.mark.parametrize("name", BUILT_NAMES)
def test_chat_answer_ends_with_end_token(demo_models, name):
    import torch
    from transformers import AutoModelForCausalLM

    folder = demo_models[name]
    tok = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What sound does a dog make?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=40, do_sample=False)
    answer = out[0, prompt["input_ids"].shape[1] :].tolist()
    # generation_config carries eos, so generate stops on <|im_end|> well before the limit.
    assert answer[-1] == tok.eos_token_id
    assert len(answer) < 40
    assert len(re.findall(r"[A-Za-z]+", tok.decode(answer[:-1]))) >= 2


def test_trained_base_beats_random_init_on_the_corpus(demo_models):
    import torch
    from transformers import AutoModelForCausalLM

    folder = demo_models["demo-llama"]
    tok = load_tokenizer(folder)
    trained = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(0)
    random_init = AutoModelForCausalLM.from_config(trained.config)
    stream = torch.tensor(corpus_token_stream(tok))
    batch = sample_windows(stream, 16, 64, torch.Generator().manual_seed(1234))
    with torch.no_grad():
        loss_trained = trained(input_ids=batch, labels=batch).loss.item()
        loss_random = random_init(input_ids=batch, labels=batch).loss.item()
    # Random init sits near ln(vocab) ~ 7.2 nats; a few hundred steps bring it to ~1-2.
    assert loss_random > 6.5
    assert loss_trained < loss_random - 3, (loss_trained, loss_random)
    info = json.loads((folder / MARKER).read_text())
    assert info["loss_last"] < info["loss_first"]


def test_seeded_build_is_deterministic(tmp_path):
    a = make_demo_models(tmp_path / "a", seed=0, steps=2)
    b = make_demo_models(tmp_path / "b", seed=0, steps=2)
    c = make_demo_models(tmp_path / "c", seed=1, steps=2, names=("demo-llama",))
    for name in BUILT_NAMES:
        assert _weights(a[name]) == _weights(b[name])
        assert _sha(a[name] / "tokenizer.json") == _sha(b[name] / "tokenizer.json")
    assert _weights(c["demo-llama"]) != _weights(a["demo-llama"])
    assert list(c) == ["demo-llama"] and not (tmp_path / "c" / "demo-qwen2").exists()

    # Qwen2 alone, on top of a built Llama of the same seed: the Llama is reused from disk
    # (not retrained), and the result is the same as building both together.
    qwen_only = tmp_path / "b" / "demo-qwen2"
    llama_weights = _weights(b["demo-llama"])
    calls: list[tuple[str, int, int]] = []
    make_demo_models(
        tmp_path / "b", seed=0, steps=2, force=True, names=("demo",), progress=lambda *a: calls.append(a)
    )
    assert {c[0] for c in calls} == {"demo-qwen2"}
    assert _weights(qwen_only) == _weights(a["demo-qwen2"])
    assert _weights(b["demo-llama"]) == llama_weights


def test_existing_models_are_kept_and_force_rebuilds(tmp_path):
    first = make_demo_models(tmp_path, steps=1, names=("demo-llama",))
    inode = (first["demo-llama"] / "model.safetensors").stat().st_ino
    calls: list[tuple[str, int, int]] = []
    make_demo_models(tmp_path, steps=1, names=("demo-llama",), progress=lambda *a: calls.append(a))
    assert calls == []
    assert (first["demo-llama"] / "model.safetensors").stat().st_ino == inode
    make_demo_models(
        tmp_path, steps=1, names=("demo-llama",), force=True, progress=lambda *a: calls.append(a)
    )
    assert calls == [("demo-llama", 1, 1)]
    assert (first["demo-llama"] / "model.safetensors").stat().st_ino != inode
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo-build.lock", "demo-llama"]


def test_stale_partial_folders_are_cleaned_up(tmp_path):
    make_demo_models(tmp_path, steps=1, names=("demo-llama",))
    stale = tmp_path / ".demo-llama.partial-99999-deadbeef"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    make_demo_models(tmp_path, steps=1, names=("demo-llama",))
    assert not stale.exists()


def test_outdated_recipe_is_rebuilt(tmp_path):
    folder = make_demo_models(tmp_path, steps=1, names=("demo-llama",))["demo-llama"]
    info = json.loads((folder / MARKER).read_text())
    info["recipe_version"] = -1
    (folder / MARKER).write_text(json.dumps(info))
    assert not is_built(folder)
    make_demo_models(tmp_path, steps=1, names=("demo-llama",))
    assert is_built(folder)


def test_unknown_demo_name_is_a_catalogued_error(tmp_path):
    with pytest.raises(BackpropError) as err:
        make_demo_models(tmp_path, names=("demo-gpt2",))
    assert err.value.code == ErrorCode.STATE_NOT_FOUND
    assert "demo-llama" in err.value.message


def test_concurrent_builders_build_once(tmp_path):
    code = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from backpropagate.models.demo import make_demo_models\n"
        "calls = []\n"
        "out = make_demo_models(Path(sys.argv[1]), steps=2, progress=lambda *a: calls.append(a))\n"
        "print(json.dumps({'trained': bool(calls), 'paths': {k: str(v) for k, v in out.items()}}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr.decode()
        results.append(json.loads(stdout.decode().strip().splitlines()[-1]))
    # The lock lets one build; the other waits and finds the folders complete.
    assert sorted(r["trained"] for r in results) == [False, True]
    assert results[0]["paths"] == results[1]["paths"]
    for path in results[0]["paths"].values():
        assert is_built(Path(path))
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_resolve_model(demo_models, tmp_path, monkeypatch):
    assert resolve_model("demo") == str(demo_models["demo-qwen2"])
    assert resolve_model("demo-qwen2") == str(demo_models["demo-qwen2"])
    assert resolve_model("demo-llama") == str(demo_models["demo-llama"])
    # A local folder, given relative, comes back absolute.
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("my-model") == str(tmp_path / "my-model")
    assert resolve_model("./my-model") == str(tmp_path / "my-model")
    # Hub ids (online) and paths that do not exist are left for from_pretrained to judge; offline,
    # a hub id comes from the local cache (tests/test_models_offline.py).
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert resolve_model("./no-such-folder") == "./no-such-folder"
    assert set(DEMO_NAMES) == {"demo", "demo-llama", "demo-qwen2"}


def test_resolve_model_builds_on_first_use(isolated_home, monkeypatch):
    # A tiny budget: this checks the first-use path, not the training.
    monkeypatch.setitem(demo.SPECS, "demo-llama", replace(demo.SPECS["demo-llama"], steps=2))
    monkeypatch.setitem(demo.SPECS, "demo-qwen2", replace(demo.SPECS["demo-qwen2"], steps=1))
    path = Path(resolve_model("demo"))
    assert path == isolated_home / "models" / "demo-qwen2"
    assert is_built(path)
    assert json.loads((path / MARKER).read_text())["steps"] == 1


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BACKPROPAGATE_HOME": str(home), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "backpropagate", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_cli_make_demo_prints_paths(demo_models, home):
    # The session's models exist, so this returns quickly with the same folders.
    done = _cli("models", "make-demo", "--json", home=home)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {k: str(v) for k, v in demo_models.items()}
    plain = _cli("models", "make-demo", home=home)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.split() == [w for k, v in demo_models.items() for w in (k, str(v))]


def test_cli_list_shows_built_and_local_models(demo_models, home, tmp_path):
    other = home / "models" / "my-finetune"
    other.mkdir(exist_ok=True)
    (other / "config.json").write_text("{}")
    try:
        done = _cli("models", "list", "--json", home=home)
    finally:
        (other / "config.json").unlink()
        other.rmdir()
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert rows["demo-qwen2"]["built"] and rows["demo-qwen2"]["aliases"] == ["demo"]
    assert rows["demo-llama"]["built"] and rows["demo-llama"]["architecture"] == "llama"
    assert rows["my-finetune"]["kind"] == "local"

    empty = _cli("models", "list", home=tmp_path / "fresh")
    assert empty.returncode == 0, empty.stderr
    assert "not built" in empty.stdout and "make-demo" in empty.stdout


def test_cli_and_demo_module_do_not_import_torch():
    code = "import sys, backpropagate.cli, backpropagate.models.demo; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.stdout.strip() == "False", done.stderr
