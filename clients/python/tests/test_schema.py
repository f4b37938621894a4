"""The package's schema is the repository's queueber.capnp, byte for byte."""

from pathlib import Path

import queueber._wire as wire

REPO_SCHEMA = Path(__file__).resolve().parents[3] / "queueber.capnp"
PACKAGE_SCHEMA = Path(__file__).resolve().parents[1] / "src" / "queueber" / "queueber.capnp"


def test_package_copy_matches_repository_schema() -> None:
    assert REPO_SCHEMA.read_bytes() == PACKAGE_SCHEMA.read_bytes(), (
        "clients/python/src/queueber/queueber.capnp differs from queueber.capnp: "
        "copy the repository's schema into the package")


def test_installed_schema_matches_repository_schema() -> None:
    # The schema the installed package actually loads.
    assert wire.SCHEMA_PATH.read_bytes() == REPO_SCHEMA.read_bytes()
