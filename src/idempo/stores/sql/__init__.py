"""SQL shipped as SQL: schemas and named query blocks, read with :func:`idempo.stores._base.load_queries`."""
