"""The `fedbrain` command line (filled in by the CLI module)."""


def main(argv=None):  # pragma: no cover - replaced below
    raise SystemExit("fedbrain CLI not built yet")
