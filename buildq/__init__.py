"""buildq: trigger builds on CI systems and follow each to a terminal state through a SQL queue."""

__version__ = "0.1.0"
