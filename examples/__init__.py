"""Minimal apps, one per framework, each made idempotent with idempo (see docs/frameworks.md)."""
