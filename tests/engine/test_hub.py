"""Hub names: resolved from a Hugging Face cache laid out as `snapshot_download` leaves it
(never the network: these machines reach no hub), revisions, offline errors, which files a
download asks for, and the deployment record that carries the name and revision."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny_models import build_tiny_model, mixed_prompts

import mii
from mii.config import MIIConfig, ModelConfig
from mii.engine import hub
from mii.engine.loader import model_folder, resolve_model_path

pytestmark = pytest.mark.timeout(120)

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
GREEDY = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)


def cache_snapshot(cache: Path, name: str, folder: str, commit: str, refs=("main",), only=None):
    """Lay `folder` out in `cache` as huggingface_hub does: content-addressed blobs, a
    snapshot of symlinks per commit, refs naming commits."""
    repo = cache / f"models--{name.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(Path(folder).iterdir()):
        if only is not None and f.name not in only:
            continue
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def prompts():
    return mixed_prompts(3, (5, 40, 17), seed=2)


def greedy(path: str, prompts, **kwargs) -> list[list[int]]:
    return [r.token_ids for r in mii.pipeline(path, **kwargs)(prompts, **GREEDY)]


def test_hub_name_loads_from_the_cache_offline(tiny_model, offline_cache, prompts):
    folder = tiny_model("llama")
    snapshot = cache_snapshot(offline_cache, "tiny-org/tiny-llama", folder, COMMIT_A)
    assert model_folder("tiny-org/tiny-llama") == str(snapshot)
    assert greedy("tiny-org/tiny-llama", prompts) == greedy(folder, prompts)


def test_hf_home_locates_the_cache(tiny_model, tmp_path, monkeypatch, prompts):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    cache_snapshot(tmp_path / "home" / "hub", "org/m", tiny_model("qwen2"), COMMIT_A)
    assert model_folder("org/m").startswith(str(tmp_path / "home" / "hub"))


def test_revision_picks_its_snapshot(tiny_model, tmp_path, offline_cache, prompts):
    other = build_tiny_model("llama", str(tmp_path / "seed1"), seed=1)
    cache_snapshot(offline_cache, "org/m", tiny_model("llama"), COMMIT_A, refs=("main",))
    cache_snapshot(offline_cache, "org/m", other, COMMIT_B, refs=("v2",))
    first, second = greedy(tiny_model("llama"), prompts), greedy(other, prompts)
    assert first != second  # the two snapshots answer differently
    assert greedy("org/m", prompts) == first
    assert greedy("org/m", prompts, revision="v2") == second
    assert greedy("org/m", prompts, revision=COMMIT_A) == first


def test_absent_model_fails_clearly_offline(offline_cache):
    with pytest.raises(FileNotFoundError, match=r"'nobody/absent'.*nor in the Hugging Face cache"):
        mii.pipeline("nobody/absent")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        model_folder("nobody/absent")


def test_absent_revision_fails_clearly_offline(tiny_model, offline_cache):
    cache_snapshot(offline_cache, "org/m", tiny_model("llama"), COMMIT_A)
    with pytest.raises(FileNotFoundError, match=r"revision 'v9'"):
        model_folder("org/m", revision="v9")


def test_partial_snapshot_names_what_is_missing(tiny_model, offline_cache):
    """A snapshot that holds only what AutoConfig fetched is not taken for the model."""
    cache_snapshot(offline_cache, "org/m", tiny_model("llama"), COMMIT_A, only={"config.json"})
    with pytest.raises(FileNotFoundError, match=r"missing: weights"):
        model_folder("org/m")
    assert model_folder("org/m", weights=False).endswith(COMMIT_A)  # config is enough here


def test_other_weight_copies_beside_the_model_are_ignored(tiny_model, tmp_path, prompts):
    """Mistral's repositories hold `consolidated.safetensors` beside the HF weights."""
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "with-consolidated"
    shutil.copytree(tiny_model("mistral"), folder)
    save_file({"tok_embeddings.weight": __import__("torch").zeros(2, 2)},
              str(folder / "consolidated.safetensors"))  # fmt: skip
    assert greedy(str(folder), prompts) == greedy(tiny_model("mistral"), prompts)


def test_download_asks_only_for_what_the_engine_reads(tiny_model, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    calls = []
    repo_files = sorted(os.listdir(tiny_model("llama"))) + [
        "README.md", "consolidated.safetensors", "pytorch_model.bin", "original/params.json",
    ]  # fmt: skip

    def model_info(self, name, revision=None, **kw):
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=f) for f in repo_files])

    def snapshot_download(name, revision=None, allow_patterns=None, cache_dir=None, **kw):
        calls.append((name, revision, sorted(allow_patterns)))
        return str(cache_snapshot(Path(cache_dir), name, tiny_model("llama"), COMMIT_A))

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    path = model_folder("org/fresh", revision="v1")
    (name, revision, files) = calls[0]
    assert (name, revision) == ("org/fresh", "v1")
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    assert not {"README.md", "consolidated.safetensors", "pytorch_model.bin"} & set(files)
    assert not [f for f in files if "/" in f]
    assert Path(path, "model.safetensors").is_file()


def test_files_to_download_choose_one_set_of_weights():
    sharded = [
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "tokenizer.model", "special_tokens_map.json", "README.md", ".gitattributes",
        "model.safetensors.index.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "consolidated.safetensors",
        "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin", "original/consolidated.00.pth",
    ]  # fmt: skip
    files = hub.files_to_download(sharded, weights=True)
    assert [f for f in files if "safetensors" in f] == [
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert not [f for f in files if f.endswith((".bin", ".pth", ".md"))]
    torch_only = ["config.json", "pytorch_model.bin", "vocab.json", "merges.txt", "tf_model.h5"]
    assert hub.files_to_download(torch_only, weights=True) == [
        "config.json", "vocab.json", "merges.txt", "pytorch_model.bin",
    ]  # fmt: skip
    assert hub.files_to_download(sharded, weights=False) == [
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "tokenizer.model", "special_tokens_map.json",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "is_hub"),
    [
        ("mistralai/Mistral-7B-v0.1", True),
        ("gpt2", True),
        ("Qwen/Qwen3-8B", True),
        ("./models/mistral", False),
        ("/abs/path", False),
        ("~/models/x", False),
        ("org/model/extra", False),
        ("a/../b", False),
    ],
)
def test_hub_names(name, is_hub):
    assert hub.is_hub_name(name) is is_hub


def test_unknown_names_say_what_a_name_may_be():
    with pytest.raises(FileNotFoundError, match="local Hugging Face folder, a Hub name"):
        resolve_model_path("./no/such/folder")


def test_deployment_record_carries_the_name_and_revision_not_a_path(offline_cache):
    config = ModelConfig(model_name_or_path="org/model", revision="v2")
    record = MIIConfig(model_config=config).model_dump(mode="json", by_alias=True)
    assert record["model_config"]["model_name_or_path"] == "org/model"
    assert record["model_config"]["revision"] == "v2"
    # A worker resolves the name itself: without touching the cache or the Hub here, the
    # engine's config keeps the name and revision that the engine fetches.
    engine_config = config.to_engine_config(resolve_model_path("org/model"))
    assert (engine_config.model, engine_config.revision) == ("org/model", "v2")


def test_an_unreachable_hub_says_how_to_run_from_the_cache(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))

    def unreachable(self, name, revision=None, **kw):
        raise OSError("[Errno 111] Connection refused")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(ConnectionError, match=r"org/m.*Connection refused.*HF_HUB_OFFLINE=1"):
        model_folder("org/m")
