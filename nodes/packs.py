"""Where SafeDIG packs live in ComfyUI: the `safedig` models folder and the packs shipped in `dictionaries/`.

The folder is registered with `folder_paths` (so `extra_model_paths.yaml` entries under `safedig:` are
kept and searched too). Pack names come from workflows, so they are resolved only inside the registered
folders: absolute names, `..` and symlinks that lead outside every folder are refused.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path, PurePosixPath, PureWindowsPath

import folder_paths

from safedig_core.errors import PackError
from safedig_core.hooks import ALL_DOMAINS
from safedig_core.pack import PACK_SUFFIX, PackSummary, read_summary

FOLDER = "safedig"
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "dictionaries"
SOURCE_DOMAIN = "(source)"  # the Load Dictionary domain option meaning "the pack's source domain"
log = logging.getLogger("safedig")


def register_folder() -> list[str]:
    """Register (idempotently) models/safedig + dictionaries/; keep paths that extra_model_paths.yaml
    already added. Returns the search folders in order."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    entry = folder_paths.folder_names_and_paths.get(FOLDER)
    paths = entry[0] if entry else []
    if default not in paths:
        paths.insert(0, default)
    shipped = str(SHIPPED_DIR)
    if shipped not in paths:
        paths.append(shipped)
    exts = set(entry[1]) if entry and entry[1] else set()
    exts.add(PACK_SUFFIX)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, exts)
    return list(paths)


def search_folders() -> list[str]:
    return register_folder()


def list_packs() -> list[str]:
    register_folder()
    return sorted(n for n in folder_paths.get_filename_list(FOLDER) if n.endswith(PACK_SUFFIX))


def _fix_hint() -> str:
    return ("put the .safetensors pack in models/safedig/ (or a folder listed under `safedig:` in "
            "extra_model_paths.yaml) and refresh the node list, or pick a pack from the list")


def resolve_pack(name: str) -> str:
    """Absolute path of pack `name` inside a registered folder, or a PackError naming the searched folders."""
    folders = search_folders()
    if not isinstance(name, str):
        raise PackError(f"the pack value {name!r:.60} ({type(name).__name__}) is not a pack file name; it must be "
                        "the name of a .safetensors file in the safedig folders", _fix_hint())
    if not name.strip():
        raise PackError("no pack selected", _fix_hint())
    if (os.path.isabs(name) or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive
            or ".." in PurePosixPath(name.replace("\\", "/")).parts):
        raise PackError(f"pack name {name!r} must be a plain name inside the safedig folders (no absolute "
                        f"path, no '..'); searched: {folders}", _fix_hint())
    if not name.endswith(PACK_SUFFIX):
        raise PackError(f"pack name {name!r} does not end in {PACK_SUFFIX}; searched: {folders}", _fix_hint())
    for folder in folders:
        candidate = os.path.join(folder, name)
        if not os.path.isfile(candidate):
            continue
        real, root = os.path.realpath(candidate), os.path.realpath(folder)
        if os.path.commonpath([real, root]) != root:
            raise PackError(f"pack {name!r} in {folder} is a link to {real}, outside the safedig folders",
                            "copy the pack into models/safedig/ instead of linking it, or add its real folder "
                            "under `safedig:` in extra_model_paths.yaml")
        return candidate
    raise PackError(f"pack {name!r} not found; searched: {folders}", _fix_hint())


_summaries: dict[str, tuple[tuple[int, int], PackSummary | PackError]] = {}


def pack_summary(path: str) -> PackSummary:
    """The pack's checked header (safedig_core.pack.read_summary), cached by mtime and size: the node list
    reads every pack each time it is built. Raises the pack's PackError (also cached) if it is malformed."""
    try:
        st = os.stat(path)
    except OSError:
        return read_summary(path)  # gone or unreadable: read_summary names the problem
    key = (st.st_mtime_ns, st.st_size)
    cached = _summaries.get(path)
    if cached is None or cached[0] != key:
        try:
            result: PackSummary | PackError = read_summary(path)
        except PackError as exc:
            result = exc
            # One line per file version: the node list is rebuilt on every page load.
            log.warning("SafeDIG: pack left out of the domain list until it is fixed: %s", exc)
        cached = _summaries[path] = (key, result)
    result = cached[1]
    if isinstance(result, PackError):
        raise PackError(result.problem, result.fix, path=result.path)
    return result


def all_domains() -> list[str]:
    """The domain combo's options: '(all domains)', '(source)', then every domain named by any valid pack in
    the folders.
    A malformed pack is skipped here (one log line) and reported when it is chosen."""
    names: list[str] = []
    for name in list_packs():
        try:
            summary = pack_summary(resolve_pack(name))
        except PackError:
            continue
        names += [d for d in summary.domains if d not in names]
    return [ALL_DOMAINS, SOURCE_DOMAIN, *names]


def file_fingerprint(name: str) -> str:
    try:
        return path_fingerprint(resolve_pack(name))
    except (PackError, OSError):
        return f"missing:{name}"


def path_fingerprint(path: str) -> str:
    """Changes whenever the file is replaced or rewritten (path, mtime, size)."""
    st = os.stat(path)
    return f"{path}:{st.st_mtime_ns}:{st.st_size}"


# ------------------------------------------------------------------------------------------ prompt sets

PROMPTS_FOLDER = "safedig_prompts"
PROMPT_SUFFIX = ".jsonl"
SHIPPED_PROMPTS = SHIPPED_DIR / "prompts"


def register_prompt_folder() -> list[str]:
    """models/safedig/prompts/ (the user's own sets) first, then the prompt sets shipped in dictionaries/prompts/."""
    default = os.path.join(folder_paths.models_dir, FOLDER, "prompts")
    entry = folder_paths.folder_names_and_paths.get(PROMPTS_FOLDER)
    paths = entry[0] if entry else []
    for path in (default, str(SHIPPED_PROMPTS)):
        if path not in paths:
            paths.append(path)
    folder_paths.folder_names_and_paths[PROMPTS_FOLDER] = (paths, {PROMPT_SUFFIX})
    return list(paths)


def list_prompt_sets() -> list[str]:
    register_prompt_folder()
    return sorted(n for n in folder_paths.get_filename_list(PROMPTS_FOLDER) if n.endswith(PROMPT_SUFFIX))


def resolve_prompt_set(name: str) -> str:
    folders = register_prompt_folder()
    path = folder_paths.get_full_path(PROMPTS_FOLDER, name) if isinstance(name, str) and name else None
    if path is None or ".." in PurePosixPath(str(name).replace("\\", "/")).parts:
        raise PackError(f"prompt set {name!r} not found; searched: {folders}",
                        f"put a {PROMPT_SUFFIX} file (JSON lines, docs/training.md) in models/safedig/prompts/ and "
                        "refresh, or paste the prompts into the node")
    return path
