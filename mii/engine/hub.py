"""Models from the Hugging Face Hub: the local HF cache first, else a download.

A Hub name (`org/model`) resolves to a snapshot folder of the cache that `snapshot_download`
fills (`<cache>/models--org--model/snapshots/<commit>`, `refs/<branch>` naming the commit).
The cache is read directly, so a cached model loads with no network call and under any
huggingface_hub version; only what the engine reads is downloaded (config, tokenizer,
safetensors weights or, where a repository has none, its PyTorch weights), with
huggingface_hub's progress bars. `HF_HUB_OFFLINE=1` forbids downloads; `HF_TOKEN` reaches
gated and private repositories (huggingface_hub reads it). The environment is read at each
call, not at import, so that a process may set it after importing mii.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

ENGINE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",  # sentencepiece (Llama 2, Mistral, Gemma)
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def is_hub_name(name: str) -> bool:
    """`org/model` (or a legacy one-part name such as `gpt2`), not a filesystem path."""
    if name.startswith((".", "/", "~")) or ".." in name or name.endswith(".git"):
        return False
    return bool(_REPO_ID.match(name)) and len(name) <= 96


def hub_cache_dir() -> Path:
    """Where the HF cache lives: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(cache).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(
        (f or "").strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags
    )


def hub_model_path(name: str, revision: str | None = None, weights: bool = True) -> str:
    """The local folder of Hub model `name` at `revision` (a branch, tag or commit; None:
    the default branch): the cached snapshot when it holds every file the engine needs,
    else downloaded into the cache. `weights=False` needs only config and tokenizer."""
    cache = hub_cache_dir()
    snapshot = cached_snapshot(cache, name, revision)
    missing = _missing_files(snapshot, weights) if snapshot else ["the whole snapshot"]
    if not missing:
        return str(snapshot)
    where = f"{name!r}" + (f" (revision {revision!r})" if revision else "")
    if hub_offline():
        raise FileNotFoundError(
            f"model {where} is neither a local folder nor in the Hugging Face cache at {cache} "
            f"(missing: {', '.join(missing[:4])}), and HF_HUB_OFFLINE is set, so it cannot be "
            f"downloaded: run `hf download {name}` where the Hub is reachable (same "
            "HF_HOME / HF_HUB_CACHE), or unset HF_HUB_OFFLINE"
        )
    return _download(name, revision, cache, weights, where)


def cached_snapshot(cache: Path, name: str, revision: str | None) -> Path | None:
    """The snapshot folder a revision names in the cache, None when absent."""
    repo = cache / ("models--" + name.replace("/", "--"))
    rev = revision or "main"
    commit = rev if _COMMIT.match(rev) else None
    ref = repo / "refs" / rev
    if commit is None and ref.is_file():
        commit = ref.read_text().strip()
    if commit is None:
        return None
    snapshot = repo / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def _missing_files(folder: Path, weights: bool) -> list[str]:
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if weights:
        missing += _missing_weights(folder)
    return missing


def _missing_weights(folder: Path) -> list[str]:
    for index in (SAFETENSORS_INDEX, TORCH_INDEX):
        if (folder / index).is_file():
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            return [s for s in shards if not (folder / s).is_file()]
    if any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")):
        return []
    return ["weights (*.safetensors)"]


def files_to_download(repo_files: list[str], weights: bool) -> list[str]:
    """What the engine reads of a repository's files: top-level config and tokenizer
    files, and one set of weights (safetensors when there are any; never Mistral's
    `consolidated` copies nor other formats)."""
    top = [f for f in repo_files if "/" not in f]
    chosen = [f for f in top if f in ENGINE_FILES]
    if not weights:
        return chosen
    safetensors = [
        f for f in top if f.endswith(".safetensors") and not f.startswith("consolidated")
    ]
    if safetensors:
        index = [SAFETENSORS_INDEX] if SAFETENSORS_INDEX in top else []
        return chosen + index + sorted(safetensors)
    torch_files = [f for f in top if re.fullmatch(r"pytorch_model.*\.bin", f)]
    index = [TORCH_INDEX] if TORCH_INDEX in top else []
    return chosen + index + sorted(torch_files)


def _download(name: str, revision: str | None, cache: Path, weights: bool, where: str) -> str:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        info = HfApi().model_info(name, revision=revision)
        files = files_to_download([s.rfilename for s in info.siblings or []], weights)
        if "config.json" not in files:
            raise FileNotFoundError(f"Hub model {where} has no config.json (not transformers')")
        # The revision as given (not the commit), so that refs/<branch> is written and a
        # later offline run finds the snapshot by the same name.
        path = snapshot_download(
            name, revision=revision, allow_patterns=files, cache_dir=str(cache)
        )
    except GatedRepoError as exc:
        raise PermissionError(
            f"Hub model {where} is gated: accept its terms on huggingface.co and set HF_TOKEN"
        ) from exc
    except RevisionNotFoundError as exc:
        raise FileNotFoundError(f"Hub model {name!r} has no revision {revision!r}") from exc
    except RepositoryNotFoundError as exc:
        raise FileNotFoundError(
            f"model {where} is neither a local folder nor a Hub model (a private repository "
            "needs HF_TOKEN)"
        ) from exc
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as exc:  # the network: connection refused, timeouts, Hub errors
        raise ConnectionError(
            f"could not download {where} from the Hugging Face Hub ({exc}); with the model "
            f"in the cache at {cache}, HF_HUB_OFFLINE=1 skips the Hub"
        ) from exc
    missing = _missing_files(Path(path), weights)
    if missing:
        raise FileNotFoundError(f"Hub model {where} lacks {', '.join(missing[:4])}")
    return path
