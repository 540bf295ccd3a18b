"""Lua scripts of the Redis store, one per transition; each documents its KEYS/ARGV/return."""
