"""qcompile compiler: driver, CLI, frontends and the artifact writer."""

__version__ = "0.1.0"
