"""The one upload to the Hugging Face Hub: the only caller of ``huggingface_hub.HfApi.upload_folder``.

Both ``zyke-train train --hf-push`` (``zyke_train.train.push_to_hub``) and ``zyke-train publish``
(``zyke_train.publish.upload``) go through ``upload_folder``, so the token lookup, the repo creation and the upload
are done one way, and every way it can fail (huggingface_hub not installed, no token, the Hub unreachable or refusing
the write) comes out as one error type, ``errors.HubError``, that each command words for its user.
huggingface_hub is imported inside the function: nothing else in this package needs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import HubError

#: The message when no token is found (the upload needs a write token).
NO_TOKEN = "no Hugging Face token: set HF_TOKEN or run `hf auth login` (a write token)"


@dataclass(frozen=True)
class Uploaded:
    """Where an upload landed: the model repo's URL and the URL of the commit it made."""

    repo_url: str
    commit_url: str


def upload_folder(folder: Path, repo_id: str, commit_message: str, *, token: str | None = None,
                  private: bool | None = None) -> Uploaded:
    """Create the model repo ``repo_id`` if needed and upload the files of ``folder`` to it as one commit.

    The token is ``token``, else ``HF_TOKEN``, else the one ``hf auth login`` saved. ``private`` is the new repo's
    visibility (``None``: the Hub's default); an existing repo keeps its own. Raises ``HubError``.
    """
    try:
        from huggingface_hub import HfApi, get_token
    except ImportError as exc:
        raise HubError("uploading to the Hugging Face Hub needs huggingface_hub: pip install 'zyke[train]'",
                       "no_package", exc) from exc
    try:
        token = token or os.environ.get("HF_TOKEN") or get_token()
    except Exception as exc:  # get_token raises when an OIDC token exchange (HF_OIDC_RESOURCE) fails
        raise HubError(f"could not get a Hugging Face token: {exc}", "no_token", exc) from exc
    if not token:
        raise HubError(NO_TOKEN, "no_token")
    api = HfApi(token=token)
    try:
        repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 commit_message=commit_message)
    except Exception as exc:  # network errors, HTTP 401/403, bad repo ids: all end the upload the same way
        raise HubError(f"could not upload to {repo_id}: {exc}", "upload", exc) from exc
    return Uploaded(repo_url=str(repo_url), commit_url=info.commit_url)
