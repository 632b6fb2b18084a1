"""Preset configurations (YAML), installed as fastdiff.configs."""
