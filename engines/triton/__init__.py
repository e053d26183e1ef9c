"""Triton Inference Server deployment: model repositories from build directories, and a local server.

    python -m engines.triton BUILD_DIR --out model_repository/     # write the repository
    python -m engines.triton.server model_repository/               # serve it (nvidia-pytriton's server)

tritonclient (the [triton] extra) is imported lazily and the server (the pinned nvidia-pytriton wheel,
`icmoe.core.fetch`) fetched on first use, so the rest of the project works without them.
"""

from engines.triton.repository import (
    KINDS,
    RepositoryError,
    RepositoryOptions,
    make_repository,
    model_config,
    parse_config,
)

__all__ = ["KINDS", "RepositoryError", "RepositoryOptions", "make_repository", "model_config", "parse_config"]
