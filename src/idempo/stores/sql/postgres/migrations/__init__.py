"""Numbered migrations, applied in order by ``idempo migrate``."""
