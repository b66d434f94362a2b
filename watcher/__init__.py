"""xray-watcher: screen chest X-rays dropped into an inbox for pneumonia."""

__version__ = "0.1.0"  # the one place: pyproject.toml reads it ([tool.setuptools.dynamic])
