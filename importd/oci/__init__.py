"""Pulls of OCI container images (``PullOci``, transfer type pull-oci).

``reference`` parses image references as systemd 262 does (and digests and
local sources too); ``auth`` finds credentials and answers registry
challenges; ``registry`` is the registry API v2 client and ``local`` reads
OCI layouts and archives; ``manifest`` parses indexes, manifests and
configurations; ``layer`` unpacks one layer with GNU tar and ``whiteouts``
turns its markers into overlayfs ones; ``store`` is the pool's layer store
and its locks; ``install`` writes the image (a mount stack, or
``flatten``\\ ed into one tree) and its settings; ``job`` runs a pull.
"""

from importd.oci.job import DEFAULT_PARALLEL, OciPullRequest, pull_oci
from importd.oci.reference import is_valid as ref_is_valid

__all__ = ["DEFAULT_PARALLEL", "OciPullRequest", "pull_oci", "ref_is_valid"]
