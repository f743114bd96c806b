"""The Identity Connector edge daemon."""

# The distribution name in pyproject.toml, whose installed metadata contains the version.
DISTRIBUTION = "identity-connector"


def installed_version() -> str:
    """Return the version of the installed identity-connector distribution."""
    # Imported here: importlib.metadata takes tens of milliseconds to import, and only
    # --version, status and the start of serve need it.
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown (the identity-connector package is not installed)"
