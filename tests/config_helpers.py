"""Load a Hugging Face config.json written from a dict, as a user's file would be."""

from __future__ import annotations

import json

from planner.loaders import load_model


def load_config_dict(tmp_path, data: dict):
    """The ModelSpec meshplan reads from `data` saved as tmp_path/config.json."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return load_model(str(path))
