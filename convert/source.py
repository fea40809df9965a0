"""SOURCE of `glm-mlx convert SOURCE --out DIR` -> a local checkpoint folder.

A string naming an existing folder is used as it is. A string shaped like a
Hugging Face repo id ("owner/name") is downloaded with huggingface_hub's
`snapshot_download` into its usual cache (HF_HOME / HF_HUB_CACHE, or
`cache_dir`): the token comes from `token`, else from HF_TOKEN or
`hf auth login`, as huggingface_hub itself decides; its progress bars show.

Only what a conversion reads is fetched, in two steps of one commit: first
config, tokenizer, template and the shard index, then exactly the shards the
index names (a repo without an index: its top-level *.safetensors). Nothing
in a subfolder (`original/`), no *.bin or *.pth. Finished files stay in the
cache, so a rerun after an interruption fetches only what is missing.
"""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path

# What convert.convert reads from a source folder, besides the weight shards.
METADATA = ["config.json", "generation_config.json", "model.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
            "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json"]
COMMIT = re.compile(r"^[0-9a-f]{40}$")
LOGIN = "set HF_TOKEN or run `hf auth login`"


class SourceError(ValueError):
    """A SOURCE that cannot be resolved; the message says why in one line."""


def resolve_source(source: str, revision: str | None = None, token: str | None = None,
                   cache_dir: str | None = None) -> tuple[Path, dict]:
    """Local folder -> (its path, {"path": str}); a Hugging Face repo id
    ("owner/name") -> download what a conversion needs and return (the snapshot
    folder, {"repo": id, "revision": the resolved commit sha}).

    Raises SourceError with a one-line message: no such folder or repo, gated
    or private repo without a token, unknown revision, Hub unreachable, an
    interrupted download (rerunning continues it).
    """
    local = Path(source).expanduser()
    if local.is_dir():
        if revision is not None:
            raise SourceError(f"{source}: a local folder; --revision names a commit of a Hugging Face repo, "
                              "drop it or give the repo id")
        local = local.resolve()
        return local, {"path": str(local)}
    if local.exists():
        raise SourceError(f"{source}: is a file; SOURCE is a model folder or a Hugging Face repo id")
    if not is_repo_id(source):
        raise SourceError(f"{source}: no such folder, and not a Hugging Face repo id")
    return _download(source, revision, token, cache_dir)


def is_repo_id(s: str) -> bool:
    """"owner/name" in the Hub's characters, and not written as a path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if s.count("/") != 1 or s.startswith((".", "~")) or "\\" in s:
        return False
    try:
        validate_repo_id(s)
    except HFValidationError:
        return False
    return True


def _download(repo: str, revision: str | None, token: str | None, cache_dir: str | None) -> tuple[Path, dict]:
    from huggingface_hub import snapshot_download

    def fetch(rev: str | None, patterns: list[str]) -> Path:
        try:
            return Path(snapshot_download(repo, revision=rev, allow_patterns=patterns,
                                          ignore_patterns=["*/*"], token=token, cache_dir=cache_dir))
        except Exception as e:  # noqa: BLE001 - the hub's failures become one line; others pass
            mapped = _one_line(e, repo, revision)
            if mapped is e:
                raise
            raise mapped from e

    meta = fetch(revision, METADATA)
    # snapshot_download returns <cache>/models--owner--name/snapshots/<commit sha>, also
    # when it answers from the cache because the Hub is unreachable.
    sha = meta.name
    assert COMMIT.fullmatch(sha), f"unexpected snapshot folder {meta}"
    if not (meta / "config.json").is_file():
        raise SourceError(f"{repo}: has no config.json at {sha[:12]} (not a model repo?)")
    index = meta / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted({glob.escape(f) for f in json.loads(index.read_text())["weight_map"].values()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise SourceError(f"{repo}: model.safetensors.index.json is not a valid safetensors index") from None
    else:
        shards = ["*.safetensors"]
    # The same commit, so the shards match the index even if the branch moves meanwhile.
    path = fetch(sha, shards)
    return path, {"repo": repo, "revision": sha}


def _one_line(e: Exception, repo: str, revision: str | None) -> Exception:
    """huggingface_hub's (multi-line) errors -> a SourceError saying what to do."""
    import huggingface_hub.errors as hub

    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, hub.GatedRepoError):  # before RepositoryNotFoundError, its parent
        return SourceError(f"{repo}: gated repo; accept its terms on huggingface.co, then {LOGIN}")
    if isinstance(e, hub.RepositoryNotFoundError):
        return SourceError(f"{repo}: no such folder, and no such repo on the Hugging Face Hub "
                           f"(if it is private, {LOGIN})")
    if isinstance(e, hub.RevisionNotFoundError):
        return SourceError(f"{repo}: revision {revision or 'main'!r} not found on the Hugging Face Hub")
    if isinstance(e, hub.HfHubHTTPError):
        status = e.response.status_code if e.response is not None else "?"
        if status in (401, 403):
            return SourceError(f"{repo}: access refused ({status}); {LOGIN}")
        return SourceError(f"{repo}: download failed, the Hub answered {status} ({first}); "
                           "run again to continue (finished files are kept)")
    if isinstance(e, hub.LocalEntryNotFoundError):  # the Hub unreachable and the cache lacks files
        from huggingface_hub import constants

        if isinstance(e.__cause__, hub.OfflineModeIsEnabled):
            return SourceError(f"{repo}: HF_HUB_OFFLINE is set and not all its files are in the cache")
        return SourceError(f"{repo}: cannot reach the Hugging Face Hub ({constants.ENDPOINT}); "
                           "check the network, or give a local model folder as SOURCE")
    if isinstance(e, _transport_errors() + (OSError,)):  # connection dropped, disk full, short file
        return SourceError(f"{repo}: download interrupted ({type(e).__name__}: {first}); "
                           "run again to continue (finished files are kept)")
    return e


def _transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's network errors: httpx2 in huggingface_hub 2.x, httpx in 1.x
    (requests, in 0.x, raises OSErrors)."""
    for name in ("httpx2", "httpx"):
        try:
            return (__import__(name).TransportError,)
        except (ImportError, AttributeError):
            continue
    return ()
