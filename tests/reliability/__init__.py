"""The standing fault suite: a hostile or broken hub, kills, races and bad inputs (see conftest.py)."""
