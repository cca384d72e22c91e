"""Pulls over HTTP(S): ``job`` runs one (the flow), ``common`` names its
URLs and cache entries, ``download`` streams the image in, ``install`` puts
it in place."""

from importd.pull.common import PullRequest, local_name_from_url, url_is_valid
from importd.pull.job import pull

__all__ = ["PullRequest", "local_name_from_url", "pull", "url_is_valid"]
