"""`bigtransfer push`: a finished run as a Hugging Face hub repository, uploaded when asked.

The repository folder holds a model card (README.md, see modelcard.py), the model as a
transformers BitForImageClassification at its top (config.json with the class names,
model.safetensors, preprocessor_config.json: `from_pretrained(REPO)` works, and so does
bigtransfer), and as a timm state dict with timm's hub config in `timm/`. `--to-folder` and
`--dry-run` write that folder and stop; otherwise it is written to a temporary folder and uploaded
with huggingface_hub (HF_ENDPOINT and HF_TOKEN / `hf auth login` apply), our marker files left out.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from .. import rundir
from ..atomic import write_json, write_text
from ..errors import BigTransferError
from ..models import hub
from ..models.foreign_config import timm_config, timm_model_name
from ..safe_text import load_json
from . import library_export, modelcard

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
TIMM_FOLDER = "timm"
NOT_UPLOADED = [rundir.MARKER, rundir.LOCK, rundir.RECORD]


def check_repo_id(repo: str) -> str:
    """A hub repository id, OWNER/NAME, checked before anything is read or written."""
    if not REPO_ID.match(repo) or ".." in repo or repo.endswith((".git", ".")):
        raise BigTransferError(f"REPO {repo!r}: expected OWNER/NAME, e.g. alice/bit-flowers (letters, digits, "
                               f"'-', '_', '.')")
    return repo


def read_run(run_dir: Path) -> tuple[Path, dict, dict, str]:
    """final.safetensors, config.json, summary.json and the kind of a finished run, or why it is not one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BigTransferError(f"RUN_DIR {run_dir}: not a folder; name a finished run directory")
    files = {name: run_dir / name for name in ("final.safetensors", "config.json", "summary.json")}
    missing = [name for name, path in files.items() if not path.is_file()]
    if missing:
        raise BigTransferError(f"RUN_DIR {run_dir}: no {missing[0]}; push needs a finished run "
                               f"(final.safetensors, config.json and summary.json)")
    loaded = {}
    for name in ("config.json", "summary.json"):
        try:
            loaded[name] = load_json(files[name].read_text())
        except (OSError, ValueError) as err:
            raise BigTransferError(f"{files[name]}: not readable JSON ({err})") from None
        if not isinstance(loaded[name], dict):
            raise BigTransferError(f"{files[name]}: not a JSON object")
    marker = run_dir / rundir.MARKER
    kind = "finetune"
    if marker.is_file():
        try:
            kind = load_json(marker.read_text()).get("kind", kind)
        except (OSError, ValueError, AttributeError):
            raise BigTransferError(f"{marker}: damaged marker file") from None
    return files["final.safetensors"], loaded["config.json"], loaded["summary.json"], kind


def write_folder(run_dir: Path, repo: str, folder: Path, *, overwrite: bool = False, check: bool = True) -> dict:
    """The repository's files in `folder` (claimed as a push folder); checked with the libraries."""
    final, config, summary, kind = read_run(run_dir)
    if rundir.check_claim(folder, "push") and not overwrite:
        raise BigTransferError(f"--to-folder {folder}: holds an earlier push; pass --overwrite to replace it")
    source = library_export.Source(final)
    model_config = source.model.config
    timm_name = timm_model_name(model_config.arch)
    class_names = source.class_names or [str(i) for i in range(model_config.num_classes)]
    facts = modelcard.CardFacts(repo, model_config.arch, class_names, source.resolution, config, summary, kind,
                                timm_name, model_config.ws_eps)
    checks = {}
    with rundir.owned(folder, "push", flag="--to-folder"):
        library_export.write_transformers_folder(source, folder)
        if check:
            checks["transformers"] = library_export.compare_with_library(
                source, lambda: library_export.load_with_transformers(folder), "transformers")
        if timm_name is not None:
            weights = library_export.write_timm_file(source, folder / TIMM_FOLDER / library_export.WEIGHTS_NAME)
            write_json(folder / TIMM_FOLDER / "config.json",
                       timm_config(model_config.arch, model_config.num_classes, source.class_names,
                                   source.resolution or library_export.DEFAULT_RESOLUTION), what="timm config")
            if check:
                checks["timm"] = library_export.compare_with_library(
                    source, lambda: library_export.load_with_timm(weights, model_config), "timm")
        write_text(folder / "README.md", modelcard.render(facts), what="model card")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                   if p.is_file() and p.name not in NOT_UPLOADED)
    return {"folder": str(folder), "repo": repo, "files": files, "checks": checks}


def upload(folder: Path, repo: str, *, private: bool = False, message: str | None = None) -> str:
    """Create `repo` if needed and upload `folder` to it as one commit; returns the commit's URL."""
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:
        raise BigTransferError("uploading needs huggingface_hub: pip install 'bigtransfer[hub]' "
                               "(or write the folder only: --to-folder DIR)") from None
    if hub.offline():
        raise BigTransferError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or write the folder "
                               "only: --to-folder DIR")
    api = HfApi(endpoint=hub.endpoint())
    try:
        api.create_repo(repo, private=private or None, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo, ignore_patterns=NOT_UPLOADED,
                                   commit_message=message or "bigtransfer push")
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        hint = "; log in with `hf auth login` or set HF_TOKEN" if status in (401, 403) else ""
        raise BigTransferError(f"could not upload to {hub.endpoint()}/{repo}: HTTP {status} "
                               f"({str(err).splitlines()[0][:200]}){hint}") from None
    except (OSError, ValueError) as err:  # the network; the hub refusing the card's metadata
        raise BigTransferError(f"could not upload to {hub.endpoint()}/{repo} ({str(err).splitlines()[0][:200]})") \
            from None
    return str(getattr(commit, "commit_url", commit))


def push(run_dir: Path, repo: str, *, to_folder: Path | None = None, dry_run: bool = False, private: bool = False,
         message: str | None = None, overwrite: bool = False, check: bool = True) -> dict:
    """Write the run as a hub repository folder; upload it unless `to_folder` or `dry_run` says not to.

    `dry_run` without `to_folder` writes ./NAME (NAME from OWNER/NAME), as `git clone` would."""
    check_repo_id(repo)
    read_run(run_dir)  # a wrong RUN_DIR fails before any folder is made
    if to_folder is not None or dry_run:
        folder = Path(to_folder) if to_folder is not None else Path(repo.split("/")[1])
        return {**write_folder(run_dir, repo, folder, overwrite=overwrite, check=check), "uploaded": False}
    with tempfile.TemporaryDirectory(prefix="bigtransfer-push-") as tmp:
        result = write_folder(run_dir, repo, Path(tmp) / repo.split("/")[1], check=check)
        url = upload(Path(result["folder"]), repo, private=private, message=message)
    return {**result, "folder": None, "uploaded": True, "url": url}
