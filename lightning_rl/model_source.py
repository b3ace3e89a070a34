"""Where a model named by a string comes from, checked before transformers is asked to load it.

A local directory that does not exist is reported as such (with the nearest existing names), not as
a malformed hub id. A hub id that is neither cached nor reachable fails at once, saying where it was
looked for, instead of after about a minute of download retries; a cached one loads offline.
"""

from __future__ import annotations

import difflib
import os
import urllib.error
import urllib.request
from pathlib import Path

PROBE_TIMEOUT_S = 3.0


def looks_like_path(source: str) -> bool:
    """Whether ``source`` names a file-system path rather than a hub id (``namespace/name``)."""
    return (source.startswith((".", "/", "~", "\\")) or source.count("/") > 1 or "\\" in source
            or Path(source).expanduser().exists())


def check_local_dir(source: str) -> Path:
    """The directory ``source`` names; a ``FileNotFoundError`` naming what is missing (and near matches) if none."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model directory {source!r} ({path.resolve()}) has no config.json, so it is not a saved transformers "
                "model; save one with lightning_rl.models.save_policy(model, tokenizer, path) or save_pretrained"
            )
        return path
    if path.exists():
        raise FileNotFoundError(f"model {source!r} ({path.resolve()}) is a file, not a model directory or a .gguf file")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent == path.parent:
        names = [p.name for p in parent.iterdir() if p.is_dir()]
        near = difflib.get_close_matches(path.name, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(str(path.parent / n) for n in near)}?" if near else \
            f"; that folder holds {sorted(names)[:10]}" if names else "; that folder is empty"
        raise FileNotFoundError(f"model directory {source!r} does not exist (looked for {path.resolve()}){hint}")
    raise FileNotFoundError(f"model directory {source!r} does not exist (looked for {path.resolve()}; the closest "
                            f"existing folder is {parent.resolve()})")


def hub_endpoint() -> str:
    """The Hugging Face Hub endpoint (``HF_ENDPOINT``)."""
    import huggingface_hub.constants as hub

    return hub.ENDPOINT


def hub_unreachable_reason(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why ``endpoint`` cannot be reached (one request, no retries), or None when it answers."""
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError) as err:
        return str(getattr(err, "reason", err))
    return None


def hub_offline() -> bool:
    """Whether the user switched the hub off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    import huggingface_hub.constants as hub

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(hub.HF_HUB_OFFLINE) or any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def hub_cached(repo_id: str) -> bool:
    """Whether ``repo_id``'s config is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # a malformed id: not cached
        return False


def hub_load_kwargs(repo_id: str) -> dict[str, bool]:
    """``from_pretrained`` keywords for a hub id: offline when the hub is off or unreachable and the model is cached.

    Raises:
        OSError: the model is not cached and the hub is switched off or cannot be reached.
    """
    import huggingface_hub.constants as hub

    cached = hub_cached(repo_id)
    reason = "HF_HUB_OFFLINE is set" if hub_offline() else hub_unreachable_reason(hub_endpoint())
    if reason is None:
        return {}
    if cached:
        return {"local_files_only": True}
    raise OSError(
        f"model {repo_id!r} is not a local directory, not in the Hugging Face cache ({hub.HF_HUB_CACHE}), and "
        f"{hub_endpoint()} cannot be used ({reason}). Check the name; pass a local directory, a .gguf file or "
        "'smollm2-135m-instruct' (embedded); or download the model where there is a network "
        "(huggingface-cli download <id>) and copy the cache"
    )
