"""MVAR / VAR experiment orchestration: models, data, metrics and tracking shared by the workflows."""

__version__ = "0.1.0"
